"""Pure state-dict arithmetic shared by the merge methods (streaming, one key at a time).

Besides the TIES primitives (trim / elect / disjoint merge) this module holds the two pieces
that make the streaming TIES exact and fast:

- :func:`kth_smallest` — an exact linear-time order statistic (a sampled bracket, one counting
  pass, a selection among the few candidates inside the bracket); it returns exactly what
  ``torch.kthvalue`` returns.
- :func:`column_sum` — Σ over the rows of a (rows, columns) block in exactly the order in which
  ``torch.sum(dim=0)`` adds them on one wide contiguous matrix, so that a merge streamed in
  chunks is bit-identical to reference code that flattens the whole model first.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from mergelab import validate
from mergelab.errors import CheckpointError, ConfigError

_T = TypeVar("_T")

# How the top-k trim count is read (TIES, arXiv 2306.01708, Alg. 1 step 1):
#   reference: n = ⌊k·d⌋ and the threshold is the (d − n)-th smallest |τ| (the authors'
#              ``topk_values_mask``): n + 1 entries are kept, plus ties at the threshold;
#   mergelab:  round(k·d) entries are kept, plus ties (mergelab's behaviour before 0.2).
TRIM_MODES = ("reference", "mergelab")


def float_keys(pretrained: Mapping[str, Tensor]) -> list[str]:
    """Keys of the floating-point tensors (the ones task vectors are defined on)."""
    return [k for k in pretrained.keys() if pretrained[k].is_floating_point()]


def check_trim_mode(mode: str) -> str:
    return validate.choice("TIES mode", mode, TRIM_MODES)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops with exactly ``n`` intra-op threads inside the block, restoring the
    caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread():
    """Run torch ops single-threaded inside the block. The streamed merges issue many small
    ops on cache-sized chunks; with several intra-op threads every op ends in a barrier,
    which on a busy machine (more runnable threads than cores) costs far more than the op."""
    return torch_threads(1)


def prefetched(items: Iterable[_T], depth: int = 1) -> Iterator[_T]:
    """Iterate over ``items`` while a background thread produces the next ``depth`` of them.

    For streamed merges: reading the next parameter of every expert from disk (which
    releases the GIL) overlaps the arithmetic on the current one. Exceptions raised while
    producing are re-raised in the consumer; leaving the loop early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            q.put((done, e))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)


# --- exact order statistics ------------------------------------------------------------------

_PARTITION_BELOW = 1 << 20  # below this many values a plain introselect is the fastest
_SAMPLE = 1 << 18  # sample size for the bracket around the wanted rank
_RUN = 32  # consecutive values per run of a sample read from files (sample_runs)
_RUN_SAMPLE = 1 << 18  # values in such a sample
_BRACKET_SIGMAS = 5.0  # bracket half-width in standard deviations of the sample quantile
_COUNT_CHUNK = 1 << 18  # values per step of the counting pass (stays in cache)


def sample_positions(sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """The positions :func:`kth_smallest` samples (uniform, with replacement) from segments
    of these sizes: per segment, sorted positions within it. A caller that produces the
    values segment by segment can gather the sample while each segment is in cache and hand
    it to :func:`kth_smallest`. Empty below :data:`_PARTITION_BELOW` values in all."""
    n = sum(sizes)
    if n <= _PARTITION_BELOW:
        return [np.empty(0, dtype=np.int64) for _ in sizes]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.integers(0, n, size=min(n, _SAMPLE)))
    starts = np.cumsum([0, *sizes])
    cut = np.searchsorted(idx, starts)
    return [idx[cut[j] : cut[j + 1]] - starts[j] for j in range(len(sizes))]


def sample_runs(
    sizes: Sequence[int], seed: int = 0, length: int | None = None, total: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A stratified sample of runs of consecutive positions from segments of these sizes, for
    a caller that reads the values from files: one read per run instead of a page touched
    per value (a uniform sample of 2^18 of ViT-B/32's 88M values touches every 64 KiB of
    every file). The flat range [0, n) is cut into C = ``total // length`` strata of
    near-equal size, and one run of ``length`` positions is drawn uniformly within each
    (defaults :data:`_RUN`, :data:`_RUN_SAMPLE`). Per segment, the pieces of runs that fall
    in it, as (starts within the segment, lengths), in order; a run that crosses a segment
    boundary is split. The values at the pieces, segment after segment, are the C runs one
    after another: reshaped to (C, length), what :func:`bracket` takes. Empty below
    :data:`_PARTITION_BELOW` values in all."""
    length = _RUN if length is None else int(length)
    total = _RUN_SAMPLE if total is None else int(total)
    n = sum(sizes)
    n_runs = min(total, n) // length
    if n <= _PARTITION_BELOW or n_runs == 0:
        return [(np.empty(0, np.int64), np.empty(0, np.int64)) for _ in sizes]
    rng = np.random.default_rng(seed)
    strata = (np.arange(n_runs + 1, dtype=np.int64) * n) // n_runs  # each ≥ length long
    begin = strata[:-1] + rng.integers(0, strata[1:] - strata[:-1] - length + 1)
    bounds = np.cumsum([0, *sizes], dtype=np.int64)
    first = np.searchsorted(bounds, begin, side="right") - 1  # the segment holding a run's start
    last = np.searchsorted(bounds, begin + length - 1, side="right") - 1
    whole = first == last
    split = [  # the few runs across a boundary: a piece per segment they reach into
        (j, max(b, bounds[j]), min(b + length, bounds[j + 1]) - max(b, bounds[j]))
        for b, j0, j1 in zip(begin[~whole], first[~whole], last[~whole])
        for j in range(j0, j1 + 1)
    ]
    split = np.array([piece for piece in split if piece[2] > 0], np.int64).reshape(-1, 3)
    seg = np.concatenate([first[whole], split[:, 0]])
    at = np.concatenate([begin[whole], split[:, 1]])
    count = np.concatenate([np.full(whole.sum(), length), split[:, 2]])
    order = np.argsort(at, kind="stable")  # flat order (pieces never overlap)
    seg, at, count = seg[order], at[order], count[order]
    cut = np.searchsorted(seg, np.arange(len(sizes) + 1))
    return [
        (at[cut[j] : cut[j + 1]] - bounds[j], count[cut[j] : cut[j + 1]].astype(np.int64))
        for j in range(len(sizes))
    ]


def run_positions(runs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """The positions of :func:`sample_runs`' pieces, per segment, in order."""
    out = []
    for starts, lengths in runs:
        if not starts.size:
            out.append(np.empty(0, np.int64))
            continue
        # each piece's start repeated over its length, plus 0, 1, ... within the piece
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out.append(np.repeat(starts, lengths) + within)
    return out


def kth_smallest(
    values: Tensor | Sequence[Tensor],
    r: int,
    seed: int = 0,
    threads: int = 1,
    sample: np.ndarray | Tensor | None = None,
) -> float:
    """The ``r``-th smallest (1-indexed) element of ``values`` — exactly the value
    ``torch.kthvalue(values.flatten(), r)`` returns — in linear time and without sorting.

    ``values`` is one tensor or a sequence of tensors taken as their concatenation (a model's
    parameters, without concatenating them). Large inputs: the order statistic of a random
    sample brackets the wanted rank (±5 standard deviations), one counting pass finds how
    many values lie below the bracket and collects the few inside it, and an introselect
    among those gives the answer. If the bracket misses (probability ≈ 1e-6) a full
    introselect is done, so the answer is always exact. ``seed`` only fixes the sample
    (the values at :func:`sample_positions`; ``sample`` passes them in already gathered);
    ``threads`` share the counting pass.
    """
    parts = [values] if isinstance(values, Tensor) else list(values)
    segs = [_as_f32_numpy(v) for v in parts]
    sizes = [x.size for x in segs]
    n = sum(sizes)
    if not 1 <= r <= n:
        raise ValueError(f"rank {r} is outside 1..{n}")
    if n <= _PARTITION_BELOW:
        return float(np.partition(np.concatenate(segs), r - 1)[r - 1])
    if sample is None:
        pos = sample_positions(sizes, seed)
        sample = np.concatenate([seg[at] for seg, at in zip(segs, pos)])
    elif isinstance(sample, Tensor):
        sample = _as_f32_numpy(sample)
    lo, hi = bracket(sample, r, n)

    # numpy's comparisons and compaction are several times faster than torch's here
    pieces = [seg[a : a + _COUNT_CHUNK] for seg in segs for a in range(0, seg.size, _COUNT_CHUNK)]
    if threads <= 1 or len(pieces) < 2:
        counted = [_count_bracket(pieces, lo, hi)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            counted = list(
                pool.map(lambda i: _count_bracket(pieces[i::threads], lo, hi), range(threads))
            )
    below = sum(c[0] for c in counted)
    candidates = [x for c in counted for x in c[1]]
    cand = np.concatenate(candidates)
    j = r - below - 1
    if 0 <= j < cand.size:
        return float(np.partition(cand, j)[j])
    return float(np.partition(np.concatenate(segs), r - 1)[r - 1])  # bracket missed: exact


def bracket(sample: np.ndarray, r: int, n: int) -> tuple[float, float]:
    """Values ``(lo, hi)`` that hold the ``r``-th smallest of ``n`` values between them (with
    probability ≈ 1 − 1e-6), from a sample of those values: the sample's order statistics
    ±:data:`_BRACKET_SIGMAS` standard errors around rank r/n. An end beyond the sample is
    ∓inf; an empty sample gives (−inf, inf).

    ``sample`` is a uniform sample (1-D: the binomial standard error), or the C runs of a
    stratified sample of runs (2-D, one run per row: :func:`sample_runs`). Neighbouring
    values of a model are alike (the same row, the same tensor), so a run's values say less
    than as many independent ones: the standard error of the fraction of the sample below a
    value v is estimated from the runs themselves — with yc the fraction of run c below v,
    Var ≈ Σ over pairs of neighbouring strata (y2i − y2i+1)² / C² (the collapsed-strata
    estimator, conservative) — at the bracket's ends, and the bracket is widened until it
    is at least ±5 of those on both sides (never narrower than the binomial)."""
    runs = sample if sample.ndim == 2 else sample.reshape(-1, 1)
    part = runs.reshape(-1)
    s = part.size
    if s == 0:
        return -math.inf, math.inf
    p = r / n
    se = math.sqrt(p * (1 - p) / s)  # in fractions of the sample
    if runs.shape[1] > 1:  # runs: their own standard error at the sample's quantile, +10 %
        mid = min(s - 1, int(p * s))
        part = np.partition(part, mid)
        se = max(se, 1.1 * _run_se(runs, float(part[mid])))
    for _ in range(4):
        half = _BRACKET_SIGMAS * s * se + 2
        lo_i, hi_i = int(math.floor(p * s - half)), int(math.ceil(p * s + half))
        picks = [i for i in (lo_i, hi_i) if 0 <= i < s]
        part = np.partition(part, picks) if picks else part
        lo = float(part[lo_i]) if 0 <= lo_i < s else -math.inf
        hi = float(part[hi_i]) if 0 <= hi_i < s else math.inf
        if runs.shape[1] == 1:
            break  # independent values: the binomial is exact
        wider = max(_run_se(runs, v) for v in (lo, hi))  # at the ends themselves
        if wider <= se:
            break
        se = wider
    return lo, hi


def _run_se(runs: np.ndarray, v: float) -> float:
    """The standard error of the fraction of a stratified sample of runs (rows of ``runs``,
    one per stratum, strata in order) below ``v``: the collapsed-strata estimator over
    pairs of neighbouring strata; 0 for an infinite ``v``."""
    if not math.isfinite(v):
        return 0.0
    y = (runs < v).mean(axis=1)
    pairs = y.size // 2
    if pairs == 0:
        return 0.0
    d = y[0 : 2 * pairs : 2] - y[1 : 2 * pairs : 2]
    # Σ (ya − yb)² estimates Var(ya + yb); a run left over counts as half an average pair
    var_sum = float(np.dot(d, d)) * (y.size / (2 * pairs))
    return math.sqrt(var_sum) / y.size


def count_bracket(x: np.ndarray, lo: float, hi: float, lt: np.ndarray, inside: np.ndarray):
    """How many of ``x`` lie below ``lo``, and (a copy of) those in [lo, hi]; ``lt`` and
    ``inside`` are bool scratch of x's size. NaN counts in neither."""
    np.less(x, lo, out=lt)
    below = int(np.count_nonzero(lt))
    np.less_equal(x, hi, out=inside)
    inside ^= lt  # lo ≤ x ≤ hi (x < lo implies x ≤ hi)
    return below, x[np.flatnonzero(inside)]


def _count_bracket(pieces: list[np.ndarray], lo: float, hi: float) -> tuple[int, list[np.ndarray]]:
    """How many values lie below ``lo``, and those in [lo, hi] (numpy releases the GIL)."""
    size = max((x.size for x in pieces), default=0)
    lt, inside = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    below, found = 0, []
    for x in pieces:
        m = x.size
        b, inside_x = count_bracket(x, lo, hi, lt[:m], inside[:m])
        below += b
        found.append(inside_x)
    return below, found


def _as_f32_numpy(v: Tensor) -> np.ndarray:
    v = v.detach().reshape(-1)
    if v.dtype != torch.float32:
        v = v.float()
    return v.cpu().contiguous().numpy()


def trim_threshold(
    abs_tau: Tensor | Sequence[Tensor],
    k: float,
    mode: str = "reference",
    extra_zeros: int = 0,
) -> float:
    """TIES trim threshold s of one task vector: keep the entries with |τ| ≥ s.

    ``abs_tau`` holds |τ| (one tensor, or a sequence taken as their concatenation);
    ``extra_zeros`` more coordinates with τ = 0 count towards the vector's length d (the
    reference code flattens tensors that mergelab does not load, such as the text-side
    tensors of task_vectors checkpoints). ``mode`` is one of :data:`TRIM_MODES`. k = 1 keeps
    everything in both modes (the reference code crashes there: it asks ``kthvalue`` for the
    0-th value). Reference mode with k = 0 keeps the largest entries only (n = 0 → s =
    max |τ|), as the reference does.
    """
    parts = [abs_tau] if isinstance(abs_tau, Tensor) else list(abs_tau)
    r, s = trim_rank(sum(v.numel() for v in parts), k, mode, extra_zeros)
    if r == 0:
        return s
    return kth_smallest(parts, r)


def trim_rank(n: int, k: float, mode: str = "reference", extra_zeros: int = 0) -> tuple[int, float]:
    """Where the TIES trim threshold of a task vector with ``n`` loaded entries (plus
    ``extra_zeros`` zeros) lies: ``(r, 0)`` — the r-th smallest loaded |τ| (1-indexed) — or
    ``(0, s)`` when it is known without looking: s = 0 (everything kept) or inf (nothing).
    The rule of :func:`trim_threshold`."""
    check_trim_mode(mode)
    d = n + int(extra_zeros)
    if d == 0:
        return 0, 0.0
    if mode == "reference":
        keep = int(d * k)  # the reference's int(d * K), Python float arithmetic included
        if keep >= d:
            return 0, 0.0
        rank = d - keep
    else:
        keep = int(round(k * d))
        if keep <= 0:
            return 0, math.inf
        if keep >= d:
            return 0, 0.0
        rank = d - keep + 1
    if rank <= extra_zeros:  # the extra zeros are the smallest values
        return 0, 0.0
    return rank - int(extra_zeros), 0.0


def magnitude_threshold(values: Tensor, k: float) -> float:
    """The smallest |value| kept when keeping the top ``round(k·n)`` of ``values`` by
    magnitude (mergelab's trim). k = 1 keeps everything; k = 0 keeps nothing (+inf)."""
    return trim_threshold(values.detach().abs().reshape(-1), k, "mergelab")


def global_thresholds(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    k: float,
    mode: str = "mergelab",
    extra_zeros: int = 0,
) -> dict[str, float]:
    """Per task, the TIES trim threshold over the task's WHOLE flattened task vector.

    Streams one task at a time into one model-sized float32 scratch of |τt| and selects on
    it: peak extra memory is one model, never N models. Non-finite task vector entries are a
    CheckpointError naming the expert and key.
    """
    check_trim_mode(mode)
    base = {key: pretrained[key] for key in float_keys(pretrained)}  # θ0 read once
    scratch = {key: torch.empty(b.numel(), dtype=torch.float32) for key, b in base.items()}
    out = {}
    for task, sd in experts.items():
        fill_abs_task_vector(scratch, base, sd, task)
        out[task] = trim_threshold(list(scratch.values()), k, mode, extra_zeros)
    return out


def fill_abs_task_vector(
    out: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    expert: Mapping[str, Tensor],
    task: str,
    threads: int = 1,
) -> None:
    """Write |θt − θ0| for every key of ``base`` into the flat float32 ``out[key]``,
    checking shapes and finiteness. The next tensor is read while the current ones are
    done (by ``threads`` threads, as many tensors in flight)."""

    def one(key: str, v: Tensor) -> None:
        b = base[key]
        if v.shape != b.shape:
            raise CheckpointError(
                f"expert {task!r}: key {key!r} has shape {tuple(v.shape)}, "
                f"pretrained has {tuple(b.shape)}"
            )
        dst = out[key]
        torch.sub(v.reshape(-1).float(), b.reshape(-1).float(), out=dst)
        dst.abs_()
        if dst.numel() and not math.isfinite(float(dst.max())):  # max propagates NaN
            who = "pretrained" if not torch.isfinite(b).all() else f"expert {task!r}"
            raise CheckpointError(f"{who}: key {key!r} holds non-finite values")

    reads = prefetched((key, expert[key]) for key in base)
    if threads <= 1:
        for key, v in reads:
            one(key, v)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(threads) as pool:
        for key, v in reads:
            pending.append(pool.submit(one, key, v))
            while len(pending) >= threads:
                pending.popleft().result()
        for fut in pending:
            fut.result()


# --- TIES primitives (one parameter at a time) ----------------------------------------------


def trim(tau: Tensor, threshold: float) -> Tensor:
    """Zero the entries of ``tau`` whose magnitude is below ``threshold``."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_sign(trimmed: Tensor) -> Tensor:
    """TIES sign election: per coordinate, the sign of the sum of the trimmed vectors
    (``trimmed`` stacks tasks on dim 0). Coordinates summing to 0 elect +1 (mergelab's rule;
    the reference code's model-wide majority is in :mod:`mergelab.merge.ties`)."""
    s = torch.sign(trimmed.sum(0))
    return torch.where(s == 0, torch.ones_like(s), s)


def disjoint_merge(trimmed: Tensor, sign: Tensor, reduce: str) -> Tensor:
    """Combine only the entries agreeing with the elected sign, by sum or by mean over the
    agreeing (non-zero) entries."""
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    kept = trimmed * agree
    if reduce == "sum":
        return kept.sum(0)
    if reduce == "mean":
        return kept.sum(0) / agree.sum(0).clamp(min=1)
    raise ConfigError(f"unknown TIES reduce {reduce!r}; expected 'sum' or 'mean'")


# --- Σ over rows in torch's own order --------------------------------------------------------
#
# torch.sum(X, dim=0) on a contiguous (rows, d) float32 matrix (CPU) adds, for the columns
# handled by its vectorised path, the rows one after another into accumulators that start at
# 0, cascading a level up every 16 rows (4 levels); the last d mod (4 × vector width) columns
# are summed row by row in another order: rows i ≡ 0, 1, 2, 3 (mod 4) first, separately. Floating
# point addition is not associative, so reproducing reference code that sums the whole
# flattened model bit for bit needs the same order; elementwise adds are exact and do not
# depend on threading. The order is checked against torch itself on first use
# (:func:`sum_tail_width`).

_LEVELS = 4


def _level_power(size: int) -> int:
    return max(4, math.ceil(math.log2(size)) // _LEVELS) if size > 1 else 4


def _running_sum(n_rows: int) -> bool:
    """Whether torch's cascade over ``n_rows`` rows is one block (+1 row: a + b = b + a), i.e.
    a plain running sum ((0 + x0) + x1) + ..."""
    return n_rows <= (1 << _level_power(n_rows)) + 1


def _cascade(rows: list[Tensor], out: Tensor) -> Tensor:
    """Σ rows into ``out`` (same shape as one row) in the order of torch's cascaded sum."""
    step = 1 << _level_power(len(rows))
    if _running_sum(len(rows)):
        out.zero_()
        for row in rows:
            out.add_(row)
        return out
    acc = [torch.zeros_like(out) for _ in range(_LEVELS)]
    mask = step - 1
    power = _level_power(len(rows))
    i = 0
    while i + step <= len(rows):
        for _ in range(step):
            acc[0].add_(rows[i])
            i += 1
        for j in range(1, _LEVELS):
            acc[j].add_(acc[j - 1])
            acc[j - 1].zero_()
            if i & (mask << (j * power)):
                break
    while i < len(rows):
        acc[0].add_(rows[i])
        i += 1
    for j in range(1, _LEVELS):
        acc[0].add_(acc[j])
    return out.copy_(acc[0])


def _interleaved(rows: list[Tensor], out: Tensor) -> Tensor:
    """The scalar tail's order: rows ≡ q (mod 4) summed per q (cascaded), leftovers added to
    the first partial sum, then the four partial sums in order."""
    groups = len(rows) // 4
    parts = [_cascade(rows[q : 4 * groups : 4], torch.empty_like(out)) for q in range(4)]
    for row in rows[4 * groups :]:
        parts[0].add_(row)
    for q in range(1, 4):
        parts[0].add_(parts[q])
    return out.copy_(parts[0])


@functools.lru_cache(maxsize=1)
def sum_tail_width() -> int:
    """4 × torch's float32 vector width in its sum kernel (32 with 8-wide vectors): the last
    d mod (this) columns of a (rows, d) matrix are summed in the interleaved order. Found by
    matching :func:`column_sum` against
    ``torch.sum`` on a small probe (one thread: below torch's parallel grain); 0 when no width
    matches (a torch whose order differs: sums stay correct but are not bit-identical)."""
    gen = torch.Generator().manual_seed(0)
    rows, width = 9, 511  # 511 mod 16, 32, 64, 128 all differ
    x = torch.randn(rows, width, generator=gen) * torch.rand(rows, width, generator=gen).pow(6)
    want = x.sum(0)
    for tail in (32, 64, 16, 128):
        if torch.equal(column_sum(x, torch.empty(width), width, 0, tail, emulate=True), want):
            return tail
    return 0


def column_sum(
    x: Tensor,
    out: Tensor,
    total: int,
    start: int,
    tail_width: int | None = None,
    emulate: bool = False,
) -> Tensor:
    """Σ over dim 0 of ``x`` (rows, m) into ``out`` (m,), bit-identical to the corresponding
    columns of ``torch.sum(X, dim=0)`` where X is a contiguous (rows, ``total``) matrix whose
    columns ``start .. start+m`` are ``x``. ``emulate`` never calls ``torch.sum`` (the probe
    that checks the emulated order uses it)."""
    tail = sum_tail_width() if tail_width is None else tail_width
    m = x.shape[1]
    cut = total - total % tail if tail else total  # first column of torch's interleaved tail
    split = min(max(cut - start, 0), m)
    fast = 0
    if tail and not emulate and torch.get_num_threads() == 1:
        # one thread, whole vectors of columns: torch.sum takes its cascaded path itself
        # (with several threads it would split the columns and add tails of its own)
        fast = split - split % tail
        if fast:
            torch.sum(x[:, :fast], dim=0, out=out[:fast])
    rows = list(x)
    if fast < split:
        _cascade([r[fast:split] for r in rows], out[fast:split])
    if split < m:
        _interleaved([r[split:] for r in rows], out[split:])
    return out


def row_order_columns(rows: int, total: int) -> int:
    """How many leading columns of a (rows, ``total``) float32 matrix ``torch.sum(dim=0)``
    sums in plain row order, ((0 + x0) + x1) + ... — all before its interleaved tail when a
    cascade of ``rows`` is one block (rows ≤ 17), else none. Kernels that sum that way are
    bit-identical to :func:`column_sum` there."""
    if not _running_sum(rows):
        return 0
    tail = sum_tail_width()
    return total - total % tail if tail else total


def column_sum_at(x: Tensor, columns: Tensor, total: int, tail_width: int | None = None) -> Tensor:
    """:func:`column_sum` for scattered columns: ``columns`` are their positions in the
    (rows, ``total``) matrix."""
    tail = sum_tail_width() if tail_width is None else tail_width
    cut = total - total % tail if tail else total
    out = torch.empty(x.shape[1], dtype=x.dtype)
    inner = columns < cut
    for sel, fn in ((inner, _cascade), (~inner, _interleaved)):
        if bool(sel.any()):
            out[sel] = fn([r[sel] for r in x], torch.empty(int(sel.sum()), dtype=x.dtype))
    return out

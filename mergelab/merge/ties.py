"""TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

With τt = θt − θ0 over the task's WHOLE flattened vector of d entries (``scope: global``, the
authors' code) or within each tensor (``scope: per_tensor``):

1. Trim (Alg. 1 step 1): τ̂t = τt · 1{|τt| ≥ st}. ``mode: reference`` reproduces the authors'
   ``topk_values_mask``: n = ⌊k·d⌋ and st = the (d − n)-th smallest |τt|, so n + 1 entries
   are kept plus ties at st. ``mode: mergelab`` (mergelab ≤ 0.1) keeps round(k·d) entries.
2. Elect (step 2): γ = sgn(Σt τ̂t). Where γ = 0 the reference code puts the sign of Σ γ over
   the WHOLE model (its "majority" rule); mergelab mode puts +1.
3. Disjoint merge (step 3): per coordinate, the entries of τ̂t whose sign is γ, summed
   (``reduce: sum``, the vision code's default) or averaged over their count (``mean``);
   θ = θ0 + λ · merged.

Reference mode is bit-identical to the authors' code on float32 checkpoints (run
single-threaded: with several threads torch's own ``sum`` changes its order at a few
columns); Σ γ is counted exactly where the reference sums ±1 in float32 (the same sign unless
that sum is within float rounding of 0). k = 1 keeps every entry (the reference crashes).
``extra_zeros`` counts τ = 0 entries that the reference flattens but mergelab does
not load — the text-side tensors (token embedding, text projection, ...) left in
task_vectors ``ImageEncoder`` checkpoints: 25,599,489 for ViT-B/32 and B/16, 38,595,841 for
ViT-L/14. They change d and therefore the trim threshold (effective density ≈ 0.26 on the
visual weights for k = 0.2).

Streaming, two reads of every expert. Pass 1 finds every task's threshold exactly in one read:
a sample of each |τt| brackets the wanted order statistic — a stratified sample of runs (2^13
runs of 32 consecutive entries, one ``pread`` per run: a uniform sample of 2^18 single entries
would touch every page of every file), its bracket as wide as the runs' own spread requires
(:func:`ops.bracket`); one streamed pass then reads θ0 and all experts chunk by chunk on the
worker threads, each chunk differenced, made absolute, checked for non-finite values and, per
task, counted below its bracket with the few values inside it collected; a selection among
those gives the threshold (a bracket that misses, probability ≈ 1e-6, is recounted with the
whole range: the answer is always exact). Pass 2 visits one parameter at a time and works
through it in chunks of all T experts: trim (hardshrink at the float32 just below the
threshold), Σ τ̂ in torch's own summation order, elect, Σ of the entries agreeing with γ (as
γ·Σ relu(γ·τ̂), exact) and the output — five passes over the chunk. Lazy state dicts
(:class:`~mergelab.pool.LazyStateDict`) are read in slices straight into each chunk's memory,
θ0 included: no tensor is copied whole, no fresh pages are touched per read (global scope;
per-tensor thresholds need each tensor whole, so that scope reads them whole). The model-wide
majority sign is only known after pass 2, so the rare coordinates where γ = 0 with non-zero
trimmed entries (exact cancellation) are kept aside and finished at the end. Peak memory: the
output, the collected candidates (≈ 1–2 % of each task's entries) and a few chunk buffers per
thread; θ0 too when it is not lazy, and one parameter per expert read whole — independent of
the number of experts beyond that parameter.

Both passes run in fused C kernels where they can (:mod:`mergelab.merge.native`, compiled on
first use): one call per chunk reads the float32 files itself and sweeps each cache-sized
block once, with the same float32 operations in the same order as the torch ops described
above — the same bits, ≈ 1.5× faster overall. The torch ops remain the reference and the
fallback: no compiler, non-float32 sources, more than 17 experts (torch then sums in another
order), the columns of torch's interleaved tail, a chunk with undecided columns, a short read.
"""

from __future__ import annotations

import math
import mmap
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mergelab import validate
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import native, ops
from mergelab.merge.base import ChunkReader, MergeMethod, StateDict, check_experts, tensor_meta
from mergelab.pool.state import LazyStateDict

SCOPES = ("global", "per_tensor")
REDUCES = ("sum", "mean")
MODES = ops.TRIM_MODES

_CHUNK = 1 << 20  # entries per chunk summed over all experts (T rows × _CHUNK / T columns)
_FILL_CHUNK = 1 << 19  # entries per chunk of pass 1's counting (per task, in turn)


def _spans(n: int, width: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + width)) for lo in range(0, n, width)]


class Ties(MergeMethod):
    """TIES-merging with top-``k`` trim, sign election and disjoint ``reduce`` (sum | mean);
    ``mode`` = reference (the authors' code, bit for bit) | mergelab (round(k·d) kept, zero
    sums elect +1); ``extra_zeros`` = τ = 0 entries counted in d (global scope only)."""

    name = "ties"

    def __init__(
        self,
        k: float = 0.2,
        scaling: float = 0.3,
        reduce: str = "sum",
        scope: str = "global",
        mode: str = "reference",
        extra_zeros: int = 0,
    ):
        super().__init__()
        self.k = validate.fraction("ties k", k)
        self.scaling = validate.number("ties scaling", scaling)
        self.reduce = validate.choice("ties reduce", reduce, REDUCES)
        self.scope, self.mode, self.extra_zeros = _check_trim(scope, mode, extra_zeros)

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        workers = torch.get_num_threads()
        run = _TiesRun(
            pretrained, experts, self.k, self.scope, self.mode, self.extra_zeros, workers
        )
        with ops.one_thread(), run:
            out = run.merge(self.reduce, self.scaling)
        self.merged_keys = [key for key in pretrained.keys() if key in run.float_keys]
        return out


def ties_task_vectors(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    k: float = 0.2,
    scope: str = "global",
    mode: str = "reference",
    extra_zeros: int = 0,
) -> dict[str, dict[str, Tensor]]:
    """Per-task TIES-processed task vectors (trimmed, then only the entries agreeing with the
    elected sign kept — the reference's ``selected_entries``), for AdaMerging++ where λ
    scales each task's processed vector. Float keys only, float32."""
    validate.fraction("ties k", k)
    scope, mode, extra_zeros = _check_trim(scope, mode, extra_zeros)
    workers = torch.get_num_threads()
    run = _TiesRun(pretrained, experts, k, scope, mode, extra_zeros, workers)
    with ops.one_thread(), run:
        return run.task_vectors()


def _check_trim(scope: str, mode: str, extra_zeros: int) -> tuple[str, str, int]:
    validate.choice("ties scope", scope, SCOPES)
    validate.choice("ties mode", mode, ops.TRIM_MODES)
    extra_zeros = validate.integer("ties extra_zeros", extra_zeros, minimum=0)
    if extra_zeros and scope != "global":
        raise ConfigError(
            "ties extra_zeros counts entries of the whole flattened vector: scope=global"
        )
    return scope, mode, int(extra_zeros)


def _select(found: list[np.ndarray], j: int) -> float | None:
    """The ``j``-th smallest (1-indexed) of the values ``found``; None when there are fewer."""
    cand = np.concatenate(found) if found else np.empty(0, np.float32)
    return float(np.partition(cand, j - 1)[j - 1]) if 1 <= j <= cand.size else None


def _below(x: float) -> float:
    """The largest float32 below ``x`` (a float32 value): |τ| > it ⟺ |τ| ≥ x in float32."""
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


class _Source:
    """One parameter of a state dict as the chunks see it: cache-sized slices read from its
    file straight into the chunk's own memory (a lazy state dict, its file held open for the
    run), or the tensor itself (any other mapping, or per-tensor scope: read whole)."""

    def __init__(self, key: str, tensor: Tensor | None = None, sd=None, fd: int = -1):
        self.key, self.tensor, self.sd, self.fd = key, tensor, sd, fd
        self.dtype = tensor.dtype if tensor is not None else sd.dtype(key)

    def read(self, lo: int, hi: int, out: Tensor, files: ChunkReader) -> Tensor:
        """θ on positions lo..hi in float32: ``out`` filled, or a view of the tensor."""
        if self.tensor is not None:
            part = self.tensor[lo:hi]
            return part if part.dtype == torch.float32 else out.copy_(part)
        if self.dtype == torch.float32:
            return self.sd.read_into(self.key, out, lo, self.fd)
        raw = files.buffer("raw", hi - lo, self.dtype)  # a file in another dtype
        return out.copy_(self.sd.read_into(self.key, raw, lo, self.fd))

    def spec(self, lo: int) -> tuple[int, int, int] | None:
        """This source from position ``lo`` on as the fused kernels take it (file descriptor,
        byte offset, address); None unless float32 (a file, or contiguous CPU memory)."""
        if self.dtype != torch.float32:
            return None
        if self.tensor is not None:
            v = self.tensor
            return (
                (-1, 0, v[lo:].data_ptr()) if v.is_contiguous() and v.device.type == "cpu" else None
            )
        return self.fd, self.sd.data_offset(self.key) + 4 * lo, 0

    def tau(self, lo: int, hi: int, b: Tensor, out: Tensor, files: ChunkReader) -> Tensor:
        """``out`` ← θ − θ0 on positions lo..hi, in float32 (``b``: θ0 there, float32)."""
        if self.tensor is not None:
            return torch.sub(self.tensor[lo:hi].float(), b, out=out)
        return self.read(lo, hi, out, files).sub_(b)


@dataclass
class _Chunk:
    """One parameter in pass 2: what every chunk of it needs."""

    key: str
    start: int  # its first column in the reference's flattened vector
    base: _Source  # θ0
    srcs: list[_Source]  # θt
    thr: Tensor  # (T, 1) trim thresholds
    shrink: np.ndarray  # per task, the float32 just below its threshold (hardshrink's λ)
    res: Tensor | None  # merged output (flat) or None
    vec: list[Tensor] | None  # per-task selected entries (flat) or None
    reduce: str
    scaling: float


@dataclass
class _Deferred:
    """Coordinates of one parameter whose elected sign is 0 although some trimmed entry is
    not. The pass elects +1 there; the reference's model-wide majority sign, known only
    after the pass, may turn that into −1."""

    key: str
    index: Tensor  # flat positions within the parameter
    column: Tensor  # positions in the reference's flattened vector (for the sum order)
    trimmed: Tensor  # (T, z) trimmed entries


class _TiesRun:
    """One TIES computation over a pool: thresholds (pass 1), then the streamed merge
    (pass 2). A context manager: the files of lazy state dicts, read in slices, stay open
    until it exits."""

    def __init__(
        self, pretrained, experts, k: float, scope: str, mode: str, extra_zeros: int, workers: int
    ):
        check_experts(pretrained, experts)
        self.workers = max(1, int(workers))
        self.pretrained, self.experts = pretrained, experts
        self.tasks = list(experts)
        self.k, self.scope, self.mode = k, scope, mode
        self.meta = {key: tensor_meta(pretrained, key) for key in pretrained.keys()}
        # the reference flattens the state dict in sorted key order; extra zeros (text-side
        # keys) sort before the visual ones
        self.float_keys = [key for key in sorted(self.meta) if self.meta[key][1].is_floating_point]
        self.extra_zeros = extra_zeros
        self.start: dict[str, int] = {}
        at = extra_zeros
        for key in self.float_keys:
            self.start[key] = at
            at += math.prod(self.meta[key][0])
        self.total = at
        self.gamma_sum = 0
        # the state dicts read in slices, their files open for the run; each worker thread's
        # chunk buffers
        sliced = [sd for sd in (pretrained, *experts.values()) if self._sliced(sd)]
        self.files = ChunkReader(sliced, _CHUNK)
        self.slot = {id(sd): i for i, sd in enumerate(sliced)}
        # θ0 whole in memory unless it is read in slices like the experts
        self.base = None if self._sliced(pretrained) else dict(pretrained.items())
        self.thresholds: dict[str, float] | None = None
        # the fused C kernels (None: torch ops); pass 2 uses them where the reference sums a
        # column's T rows one after the other (T ≤ 17; not in torch's interleaved tail)
        self.lib = native.kernels()
        self.fused_until = ops.row_order_columns(len(self.tasks), self.total)

    def __enter__(self) -> _TiesRun:
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()

    def _sliced(self, sd) -> bool:
        """Read in slices: a lazy state dict, in global scope (per-tensor thresholds need
        whole tensors)."""
        return self.scope == "global" and isinstance(sd, LazyStateDict)

    def _fd(self, sd) -> int | None:
        """The open file of a state dict read in slices, else None."""
        slot = self.slot.get(id(sd))
        return None if slot is None else self.files.fds[slot]

    def _whole(self, key: str, states: list) -> tuple[str, list, Tensor | None]:
        """``key``'s tensors that are not read in slices (the experts' in ``states``, then
        θ0's; None where read in slices). Non-float tensors are always read whole."""
        fl = self.meta[key][1].is_floating_point
        vals = [sd[key] if self._fd(sd) is None or not fl else None for sd in states]
        v0 = self._theta0(key) if self._fd(self.pretrained) is None or not fl else None
        return key, vals, v0

    def _theta0(self, key: str) -> Tensor:
        """θ0's whole tensor ``key``."""
        return self.pretrained[key] if self.base is None else self.base[key]

    @staticmethod
    def _nonfinite(key: str, task: str, b: Tensor) -> str:
        who = "pretrained" if not torch.isfinite(b).all() else f"expert {task!r}"
        return f"{who}: key {key!r} holds non-finite values"

    def _source(self, sd, key: str, v: Tensor | None) -> _Source:
        fd = self._fd(sd)
        return _Source(key, tensor=v.reshape(-1)) if fd is None else _Source(key, sd=sd, fd=fd)

    def _pass1(self) -> None:
        """Every task's trim threshold, exactly, from one streamed read of every expert (and
        of θ0): a sample of runs of each |τt| brackets its order statistic, one counting pass
        over all tasks at once counts the entries below each bracket and collects those
        inside, and a selection among the few collected gives the threshold. A task whose
        bracket misses (probability ≈ 1e-6; never silently) is counted again with the whole
        range as its bracket."""
        if self.scope != "global":
            return
        sizes = [math.prod(self.meta[key][0]) for key in self.float_keys]
        r, known = ops.trim_rank(sum(sizes), self.k, self.mode, self.extra_zeros)
        if r == 0:  # nothing to select (k = 1, nothing loaded, ...): still check finiteness
            self._count({t: (math.inf, math.inf) for t in self.tasks})
            self.thresholds = dict.fromkeys(self.tasks, known)
            return
        n = sum(sizes)
        samples = self._sample(ops.sample_runs(sizes), ops._RUN)
        with ThreadPoolExecutor(self.workers) as pool:  # numpy's partition releases the GIL
            brackets = dict(
                zip(self.tasks, pool.map(lambda t: ops.bracket(samples[t], r, n), self.tasks))
            )
        self.thresholds = {}
        while brackets:
            below, found = self._count(brackets)
            with ThreadPoolExecutor(self.workers) as pool:
                picks = pool.map(lambda t, b=below, f=found: _select(f[t], r - b[t]), below)
                picked = dict(zip(below, picks))
            missed = [task for task, thr in picked.items() if thr is None]
            if any(brackets[task] == (-math.inf, math.inf) for task in missed):
                raise RuntimeError("TIES: an order statistic fell outside the whole range")
            self.thresholds.update((t, thr) for t, thr in picked.items() if thr is not None)
            # a bracket that missed: everything is a candidate in the recount
            brackets = dict.fromkeys(missed, (-math.inf, math.inf))

    def _sample(
        self, runs: list[tuple[np.ndarray, np.ndarray]], length: int
    ) -> dict[str, np.ndarray]:
        """Per task, |θt − θ0| at the sampled ``runs`` (:func:`ops.sample_runs`: per float
        key, the pieces of runs of ``length`` in it) as a (runs, length) float32 array.
        Float32 files are read by the kernels, one ``pread`` per run; other files are mapped
        and only the sampled pages touched (and let go of); in-memory tensors are indexed."""
        if not sum(starts.size for starts, _ in runs):
            return {t: np.empty((0, length), np.float32) for t in self.tasks}
        positions = ops.run_positions(runs)  # for the sources read by position

        def gather(sd) -> Tensor:
            fd = self._fd(sd)  # a lazy state dict's file, else None
            if (
                self.lib is not None
                and fd is not None
                and all(sd.dtype(key) == torch.float32 for key in self.float_keys)
            ):
                offsets = [
                    sd.data_offset(key) + 4 * st for key, (st, _) in zip(self.float_keys, runs)
                ]
                got = native.gather(
                    self.lib, fd, np.concatenate(offsets), np.concatenate([c for _, c in runs])
                )
                if got is not None:  # else a short read: the count pass names the file
                    return torch.from_numpy(got)
            parts = []
            if isinstance(sd, LazyStateDict):
                with (
                    open(sd.path, "rb") as f,
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
                ):
                    for key, pos in zip(self.float_keys, positions):
                        parts.append(sd.values_at(key, pos, mm).float())
            else:
                for key, pos in zip(self.float_keys, positions):
                    parts.append(sd[key].reshape(-1)[torch.from_numpy(pos)].float())
            return torch.cat(parts)

        with ThreadPoolExecutor(self.workers) as pool:
            base = pool.submit(gather, self.pretrained)
            vals = {t: pool.submit(gather, self.experts[t]) for t in self.tasks}
            b = base.result()
            # the pieces of a run split across keys follow each other: one row per run
            return {t: (v.result() - b).abs_().numpy().reshape(-1, length) for t, v in vals.items()}

    def _count(
        self, brackets: dict[str, tuple[float, float]]
    ) -> tuple[dict[str, int], dict[str, list[np.ndarray]]]:
        """One streamed read of θ0 and of the experts in ``brackets``: per task, how many
        |τ| lie below its bracket and the values inside it. θ0 is read once per chunk for all
        tasks; each chunk is read, differenced, made absolute, checked for non-finite values
        and counted while it is in cache, on the worker threads."""
        tasks = list(brackets)
        below = dict.fromkeys(tasks, 0)
        found: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        states = [self.experts[t] for t in tasks]

        lows = np.array([brackets[t][0] for t in tasks], np.float32)
        highs = np.array([brackets[t][1] for t in tasks], np.float32)

        def chunk(key: str, base: _Source, srcs: list[_Source], lo: int, hi: int):
            files, m = self.files, hi - lo
            fused = native.sources([base, *srcs], lo) if self.lib is not None else None
            if fused is not None:  # one call for the chunk, reads included
                cand = files.buffer("cand", len(tasks) * m).view(len(tasks), m)
                buf = files.buffer("fused", native.buffer_size(len(srcs) + 1))
                got = native.count(self.lib, fused, m, lows, highs, cand, buf)
                if got is not None:
                    return [(below, inside.copy()) for below, inside in got]
                # a short read or a non-finite value: the torch path below names it
            b = base.read(lo, hi, files.buffer("b", m), files)
            x = files.buffer("x", m)
            xn = x.numpy()
            lt, inside = files.buffer("lt", m, torch.bool), files.buffer("in", m, torch.bool)
            lt, inside = lt.numpy(), inside.numpy()
            out = []
            for task, src in zip(tasks, srcs):
                src.tau(lo, hi, b, x, files).abs_()
                if not math.isfinite(float(torch.amax(x))):  # amax propagates NaN
                    raise CheckpointError(self._nonfinite(key, task, b))
                out.append(ops.count_bracket(xn, *brackets[task], lt, inside))
            return out

        def collect(futures) -> None:
            for fut in futures:
                for task, (n_below, inside) in zip(tasks, fut.result()):
                    below[task] += n_below
                    if inside.size:
                        found[task].append(inside)

        pending: deque = deque()  # per tensor in flight, its chunks' futures
        with ThreadPoolExecutor(self.workers) as pool:
            for key, vals, v0 in ops.prefetched(self._whole(k, states) for k in self.float_keys):
                base = self._source(self.pretrained, key, v0)
                srcs = [self._source(sd, key, v) for sd, v in zip(states, vals)]
                n = math.prod(self.meta[key][0])
                pending.append(
                    [pool.submit(chunk, key, base, srcs, *span) for span in _spans(n, _FILL_CHUNK)]
                )
                if len(pending) > 1:  # two tensors in flight: the workers never wait for a read
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        return below, found

    def merge(self, reduce: str, scaling: float) -> StateDict:
        self._pass1()
        results: dict[str, Tensor] = {}
        deferred = self._stream(reduce, scaling, results, None)
        self._finish(deferred, results, None, reduce, scaling)
        out: StateDict = {}
        for key, (shape, dtype) in self.meta.items():
            if key in results:
                out[key] = results[key].view(shape).to(dtype)
            else:
                out[key] = self._theta0(key).clone()
        return out

    def task_vectors(self) -> dict[str, dict[str, Tensor]]:
        self._pass1()
        vectors: dict[str, dict[str, Tensor]] = {t: {} for t in self.tasks}
        deferred = self._stream("sum", 1.0, None, vectors)
        self._finish(deferred, None, vectors, "sum", 1.0)
        return {
            t: {key: vectors[t][key].view(self.meta[key][0]) for key in self.float_keys}
            for t in self.tasks
        }

    def _stream(self, reduce, scaling, results, vectors) -> list[_Deferred]:
        """Pass 2: per parameter, its chunks go to ``workers`` threads (each op inside runs
        single-threaded; the chunks are independent), each chunk reading its own slices; the
        chunks of two parameters are in flight at a time."""
        T = len(self.tasks)
        width = max(1, _CHUNK // T)
        deferred: list[_Deferred] = []
        states = [self.experts[t] for t in self.tasks]

        def collect(futures) -> None:
            for fut in futures:
                gamma, parts = fut.result()
                self.gamma_sum += gamma
                deferred.extend(parts)

        pending: deque = deque()  # per tensor in flight, its chunks' futures
        with ThreadPoolExecutor(self.workers) as pool:
            for key, vals, v0 in ops.prefetched(self._whole(k, states) for k in sorted(self.meta)):
                if not self.meta[key][1].is_floating_point:
                    for task, v in zip(self.tasks, vals):
                        if v.shape != v0.shape or not torch.equal(v, v0):
                            raise CheckpointError(
                                f"expert {task!r}: non-float key {key!r} differs from "
                                "pretrained; it cannot be merged arithmetically"
                            )
                    continue
                base = self._source(self.pretrained, key, v0)
                srcs = [self._source(sd, key, v) for sd, v in zip(states, vals)]
                thresholds = self._key_thresholds(key, v0, srcs)
                thr = torch.tensor(thresholds).view(T, 1)
                shrink = np.array([_below(x) for x in thresholds], np.float32)
                n = math.prod(self.meta[key][0])
                res = torch.empty(n) if results is not None else None
                vec = [torch.empty(n) for _ in range(T)] if vectors is not None else None
                job = _Chunk(
                    key, self.start[key], base, srcs, thr, shrink, res, vec, reduce, scaling
                )
                pending.append(
                    [pool.submit(self._chunk, job, *span, width) for span in _spans(n, width)]
                )
                if len(pending) > 1:  # two tensors in flight: no worker idles at a tensor's end
                    collect(pending.popleft())
                if res is not None:
                    results[key] = res
                if vec is not None:
                    for t, task in enumerate(self.tasks):
                        vectors[task][key] = vec[t]
            while pending:
                collect(pending.popleft())
        return deferred

    def _chunk(self, job: _Chunk, lo: int, hi: int, width: int):
        """Trim → elect (zero sums: +1 for now) → disjoint merge on columns lo..hi of one
        parameter, with the reference's sums (same terms, same order of additions). One call
        of the fused kernel where it applies (see the module docstring); otherwise five torch
        passes over the (T, m) block, in place, all with float outputs (torch's bool-valued
        ops are several times slower). Returns this chunk's Σ γ and its deferred columns."""
        T, m = len(self.tasks), hi - lo
        files = self.files  # per-thread workspace, cache-sized
        column = job.start + lo
        fused = self.lib is not None and job.res is not None and column + m <= self.fused_until
        src = native.sources([job.base, *job.srcs], lo) if fused else None
        if src is not None:  # one call for the chunk, reads included
            buf = files.buffer("fused", native.buffer_size(T + 1))
            mean = job.reduce == "mean"
            got = native.merge(self.lib, src, m, job.shrink, job.scaling, mean, job.res[lo:hi], buf)
            if got is not None and (self.mode != "reference" or not got[1]):
                # (mergelab mode: γ = +1 where Σ τ̂ = 0 is final)
                return (got[0] if self.mode == "reference" else 0), []
            # a short read (named below), or some column's γ waits for the model-wide sign:
            # the torch path defers it
        b = job.base.read(lo, hi, files.buffer("b", m), files)
        M = files.buffer("rows", 5 * width).view(5, width)
        trimmed = files.buffer("ws", T * width)[: T * m].view(T, m)
        s, g, r, z, c = (row[:m] for row in M)
        for t in range(T):
            job.srcs[t].tau(lo, hi, b, trimmed[t], files)
            # τ·1{|τ| ≥ s_t} in one pass: hardshrink keeps |τ| > λ, and λ is the float32 just
            # below s_t. Its zeros are +0 where the reference's product gives −0 for τ < 0: no
            # sum sees the difference (they start from +0), the task vectors copy τ's sign
            torch.hardshrink(trimmed[t], float(job.shrink[t]), out=trimmed[t])
        ops.column_sum(trimmed, s, self.total, column)
        torch.sign(s, out=g)
        gamma = int(g.sum()) if self.mode == "reference" else 0  # exact: |Σ| ≤ m < 2^24
        torch.eq(s, 0, out=z)
        g.add_(z)  # γ = sgn(Σ τ̂), +1 where it is 0 (provisional; see _finish)
        # |τ̂| where the entry's sign is γ, else 0: the reference's selected entries times γ,
        # so their sum in the same order is γ·(the reference's sum), negation being exact
        u = trimmed.mul_(g).relu_()  # (in place: τ̂ itself is not needed any more)
        ops.column_sum(u, r, self.total, column)
        deferred = []
        if self.mode == "reference":
            # γ = 0 although something was kept: the entries cancelled exactly
            z.mul_(r)
            if float(torch.amax(z)) > 0:
                live = torch.nonzero(z).squeeze(1)
                tau = torch.empty(T, m)
                for t in range(T):
                    job.srcs[t].tau(lo, hi, b, tau[t], files)
                tau = tau[:, live]
                trim = tau * (tau.abs() >= job.thr)  # the reference's product, −0 included
                deferred.append(_Deferred(job.key, lo + live, column + live, trim))
        if job.vec is not None:
            for t in range(T):  # the reference's zeros carry τ's sign: copy it from τ
                job.srcs[t].tau(lo, hi, b, c, files)
                torch.copysign(u[t], c, out=job.vec[t][lo:hi])
        if job.res is not None:
            # γ·Σ|kept| = Σ kept. Never −0: γ = −1 means some kept entry is < 0, so Σ|kept| > 0
            r.mul_(g)
            if job.reduce == "mean":
                torch.sum(u.sign_(), dim=0, out=c)  # how many entries were kept
                r.div_(c.clamp_(min=1))
            r.mul_(job.scaling)
            torch.add(b, r, out=job.res[lo:hi])
        return gamma, deferred

    def _key_thresholds(self, key: str, v0: Tensor | None, srcs: list[_Source]) -> list[float]:
        if self.thresholds is not None:
            return [self.thresholds[t] for t in self.tasks]
        b = v0.reshape(-1).float()  # per-tensor scope: whole tensors
        out = []
        for task, src in zip(self.tasks, srcs):
            a = (src.tensor.float() - b).abs_()
            if a.numel() and not math.isfinite(float(a.max())):
                raise CheckpointError(self._nonfinite(key, task, b))
            out.append(ops.trim_threshold(a, self.k, self.mode))
        return out

    def _finish(self, deferred, results, vectors, reduce, scaling) -> None:
        """Where γ = 0, the reference puts the model-wide majority sign sgn(Σ γ): the pass
        kept the positive entries (right when it is +1); otherwise keep the negative ones."""
        if self.gamma_sum > 0:
            return
        for d in deferred:
            keep = d.trimmed < 0
            selected = d.trimmed * keep
            if vectors is not None:
                for t, task in enumerate(self.tasks):
                    vectors[task][d.key][d.index] = selected[t]
            if results is not None:
                merged = ops.column_sum_at(selected, d.column, self.total)
                if reduce == "mean":
                    merged = merged / keep.sum(0).float().clamp(min=1)
                b = self._theta0(d.key).reshape(-1).float()[d.index]
                results[d.key][d.index] = b + scaling * merged

"""The merge-method contracts.

A *training-free* method is a pure function on state dicts::

    merge(pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict

(task → expert state dict, keys = the backbone's parameter names). It never mutates its
inputs, works for any architecture, records the keys it merged in ``merged_keys``, and treats
a key it cannot merge as an error. Experts may be lazy (:class:`~mergelab.pool.LazyStateDict`):
methods stream over keys so that peak memory holds one parameter per expert, not N models.
An *elementwise* method (``elementwise = True``: task arithmetic, weight averaging) streams
further, over cache-sized chunks of each parameter (see :meth:`MergeMethod.merge`).

An *adaptive* method (AdaMerging) learns on unlabeled data; it implements
``fit(pool, ctx) -> dict`` instead and is run by the pipeline with the pool and run context.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import ops
from mergelab.pool.state import LazyStateDict

StateDict = dict[str, Tensor]

# Entries per chunk of an elementwise merge. Its T + 1 slices and merge_key's temporaries
# (a few MB per thread for T ≈ 8) stay in the last-level cache, and the per-chunk Python
# overhead (a few dozen torch calls) stays small against the work: measured on the ViT-B/32
# bench (8 experts), 2^17 was faster than 2^15, 2^16 and 2^18.
CHUNK = 1 << 17


class MergeMethod:
    """Base for training-free merges. Subclasses implement :meth:`merge_key` (one parameter)
    or override :meth:`merge` when the method needs a global pass (e.g. TIES' global trim).

    ``elementwise = True`` declares that :meth:`merge_key` is elementwise and deterministic:
    entry i of its result depends only on entry i of θ0 and of each expert (no reductions,
    shapes, or random draws). :meth:`merge` then streams each parameter in cache-sized
    chunks of its flattened values (:func:`merge_elementwise`: :meth:`merge_key` sees 1-D
    slices in their stored dtypes) and gets the same bits as on whole tensors."""

    name: str = "merge"
    elementwise: bool = False

    def __init__(self) -> None:
        self.merged_keys: list[str] = []

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        self.merged_keys = []
        if self.elementwise:
            out, self.merged_keys = merge_elementwise(self.merge_key, pretrained, experts)
            return out
        out: StateDict = {}
        for key, base, vals in iter_params(pretrained, experts):
            if base.is_floating_point():
                out[key] = self.merge_key(key, base, vals).to(base.dtype)
                self.merged_keys.append(key)
            else:
                out[key] = base.clone()
        return out

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "merged_keys")
        return f"{type(self).__name__}({args})"


class AdaptiveMerge(ABC):
    """Base for merges that learn on unlabeled test data (AdaMerging)."""

    name: str = "adaptive"

    @abstractmethod
    def fit(self, pool, ctx) -> StateDict:
        """Return merged weights for ``pool`` using the run context's Trainer settings."""


def tensor_meta(sd: Mapping[str, Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``sd[key]``; lazy state dicts that answer ``sd.shape(key)`` and
    ``sd.dtype(key)`` from their header are not read."""
    shape, dtype = getattr(sd, "shape", None), getattr(sd, "dtype", None)
    if callable(shape) and callable(dtype):
        return tuple(shape(key)), dtype(key)
    v = sd[key]
    return tuple(v.shape), v.dtype


def check_experts(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """Every expert has θ0's keys, and every tensor θ0's shape and kind of dtype: a
    floating-point tensor where θ0's is one (of any precision: merges compute in float32 and
    return θ0's dtype), exactly θ0's dtype for integer / bool buffers. Raises one
    CheckpointError naming the expert, the key and what was expected vs found."""
    if len(experts) == 0:
        raise ConfigError("merge needs at least one expert, got none")
    keys = set(pretrained.keys())
    for task, sd in experts.items():
        got = set(sd.keys())
        if got != keys:
            missing = sorted(keys - got)
            extra = sorted(got - keys)
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise CheckpointError(f"expert {task!r} does not match the pretrained model: {what}")
    for key in pretrained.keys():
        want_shape, want_dtype = tensor_meta(pretrained, key)
        for task, sd in experts.items():
            shape, dtype = tensor_meta(sd, key)
            if shape != want_shape:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {shape}, expected {want_shape} "
                    "(the pretrained model's)"
                )
            if want_dtype.is_floating_point != dtype.is_floating_point or (
                not want_dtype.is_floating_point and dtype != want_dtype
            ):
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has dtype {dtype}, expected {want_dtype} "
                    "(the pretrained model's)"
                )


def iter_params(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
    """Yield ``(key, θ0[key], [θt[key] for t])`` one key at a time (streams lazy experts).

    Shapes must agree; non-float tensors (integer buffers) must be identical across models,
    since no arithmetic merge of them is meaningful.
    """
    check_experts(pretrained, experts)
    for key in pretrained.keys():
        base = pretrained[key]
        vals = [sd[key] for sd in experts.values()]
        for task, v in zip(experts.keys(), vals):
            if v.shape != base.shape:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {tuple(v.shape)}, "
                    f"pretrained has {tuple(base.shape)}"
                )
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"expert {task!r}: key {key!r} holds non-finite values")
            if not base.is_floating_point() and not torch.equal(v, base):
                raise CheckpointError(
                    f"expert {task!r}: non-float key {key!r} differs from pretrained; "
                    "it cannot be merged arithmetically"
                )
        yield key, base, vals


class ChunkReader:
    """Slices of the flattened tensors of state dicts, for merges that work in cache-sized
    chunks. A :class:`~mergelab.pool.LazyStateDict` is read slice by slice straight from its
    file (opened once, positional reads: safe from several threads) into a buffer the calling
    thread reuses — a fresh tensor per read would cost a page fault per 4 KiB and a trip
    through main memory. Any other mapping hands out views of its tensors (no copy). A
    context manager: the files stay open until it exits. ``chunk``: the usual slice length
    (buffers are grown for longer ones)."""

    def __init__(self, states: list[Mapping[str, Tensor]], chunk: int = CHUNK):
        self.states, self.chunk = states, chunk
        self.fds: list[int | None] = [None] * len(states)
        self.local = threading.local()  # per thread: its buffers
        try:
            for i, sd in enumerate(states):
                if isinstance(sd, LazyStateDict):
                    self.fds[i] = os.open(sd.path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    def sliced(self, i: int) -> bool:
        """Whether state dict ``i`` is read in slices (else its tensors are used whole)."""
        return self.fds[i] is not None

    def read(self, i: int, key: str, lo: int, hi: int, whole: Tensor | None) -> Tensor:
        """Entries lo..hi of the flattened tensor ``key`` of state dict ``i``, in its own
        dtype: read into this thread's buffer for slot ``i``, or ``whole`` (the tensor,
        flattened) sliced."""
        if whole is not None:
            return whole[lo:hi]
        sd = self.states[i]
        return sd.read_into(key, self.buffer(i, hi - lo, sd.dtype(key)), lo, self.fds[i])

    def buffer(self, slot, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """This thread's buffer for ``slot`` (any hashable name) of at least ``n`` elements
        (grown, never shrunk)."""
        bufs = self.local.__dict__.setdefault("bufs", {})
        buf = bufs.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = bufs[(slot, dtype)] = torch.empty(max(n, self.chunk), dtype=dtype)
        return buf[:n]

    def close(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd is not None:
                os.close(fd)
                self.fds[i] = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _all_finite(v: Tensor) -> bool:
    """Whether every entry of ``v`` is finite. One read-only pass first: a sum is finite only
    if all its terms are; a sum that overflows on finite entries falls back to the exact test."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return math.isfinite(float(torch.sum(v, dtype=acc))) or bool(torch.isfinite(v).all())


def _whole_mismatch(
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    tasks: list[str],
    vals: list[Tensor | None],
) -> CheckpointError | None:
    """:func:`iter_params`' checks of the tensors read whole (``vals``: θ0's, then the
    experts'; None where read in slices): shapes, and integer buffers equal to θ0's."""
    for task, v in zip(tasks, vals[1:]):
        if v is not None and tuple(v.shape) != shape:
            return CheckpointError(
                f"expert {task!r}: key {key!r} has shape {tuple(v.shape)}, pretrained has {shape}"
            )
        if not dtype.is_floating_point and not torch.equal(v, vals[0]):
            return CheckpointError(
                f"expert {task!r}: non-float key {key!r} differs from pretrained; "
                "it cannot be merged arithmetically"
            )
    return None


def merge_elementwise(
    merge_key: Callable[[str, Tensor, list[Tensor]], Tensor],
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    chunk: int = CHUNK,
    workers: int | None = None,
) -> tuple[StateDict, list[str]]:
    """The merge of an elementwise ``merge_key`` (see :class:`MergeMethod`), streamed: each
    float parameter in chunks of ``chunk`` entries of its flattened values, ``merge_key``
    called on θ0's and every expert's slice of the chunk (1-D, in their stored dtypes),
    the result written into the parameter's output (θ0's dtype). Bit-identical to calling
    ``merge_key`` on the whole tensors. Returns the merged state dict and the merged keys.

    The chunks of a parameter go to ``workers`` threads (default: torch's thread count; each
    op inside runs single-threaded); the next parameter's chunks are queued before the
    current one's are collected, so the workers do not wait at parameter boundaries. Checks
    as :func:`iter_params`: shapes and dtypes (:func:`check_experts`), non-finite expert
    entries (every chunk), integer buffers equal to θ0's (copied). Errors name the first
    offending key and, within it, the first offending expert, as :func:`iter_params` does.
    Peak memory: the output, (T + 1) chunk-sized buffers per thread, and the tensors of state
    dicts that are not lazy (already in memory).
    """
    check_experts(pretrained, experts)
    tasks = list(experts)
    states = [pretrained, *experts.values()]  # slot 0: θ0, slot t + 1: expert t
    meta = {key: tensor_meta(pretrained, key) for key in pretrained.keys()}
    workers = max(1, torch.get_num_threads() if workers is None else int(workers))
    chunk = max(1, int(chunk))
    out: StateDict = {}
    merged: list[str] = []

    def whole(key: str) -> tuple[str, list[Tensor | None]]:
        """``key``'s tensors that are not read in slices (None for those that are)."""
        fl = meta[key][1].is_floating_point
        return key, [None if fl and files.sliced(i) else sd[key] for i, sd in enumerate(states)]

    def work(key: str, vals: list[Tensor | None], dst: Tensor, lo: int, hi: int) -> int:
        """One chunk: -1, or the first expert holding a non-finite entry in it."""
        parts = [files.read(i, key, lo, hi, v) for i, v in enumerate(vals)]
        for t, v in enumerate(parts[1:]):
            if not _all_finite(v):
                return t
        dst[lo:hi].copy_(merge_key(key, parts[0], parts[1:]))
        return -1

    def collect(key: str, futures: list[Future]) -> None:
        bad = [t for t in (f.result() for f in futures) if t >= 0]
        if bad:  # the first expert (in order) with a non-finite entry anywhere in the key
            raise CheckpointError(
                f"expert {tasks[min(bad)]!r}: key {key!r} holds non-finite values"
            )

    pending: deque[tuple[str, list[Future]]] = deque()

    def fail(err: CheckpointError) -> None:
        """Raise the error of an earlier key still in flight, if any, else ``err``."""
        while pending:
            collect(*pending.popleft())
        raise err

    with ChunkReader(states, chunk) as files, ops.one_thread(), ThreadPoolExecutor(workers) as pool:
        try:
            for key, vals in ops.prefetched(whole(key) for key in meta):
                shape, dtype = meta[key]
                err = _whole_mismatch(key, shape, dtype, tasks, vals)
                if err is not None:
                    fail(err)
                if not dtype.is_floating_point:
                    out[key] = vals[0].clone()
                    continue
                at = None if vals[0] is None else vals[0].device  # θ0's, as merge_key's result
                res = out[key] = torch.empty(shape, dtype=dtype, device=at)
                flat = [None if v is None else v.reshape(-1) for v in vals]
                n = res.numel()
                futures = [
                    pool.submit(work, key, flat, res.view(-1), lo, min(n, lo + chunk))
                    for lo in range(0, n, chunk)
                ]
                pending.append((key, futures))
                merged.append(key)
                while len(pending) > 1:  # two keys in flight: the workers never wait for us
                    collect(*pending.popleft())
            while pending:
                collect(*pending.popleft())
        finally:
            for _, futures in pending:  # after an error: drop the queued chunks
                for f in futures:
                    f.cancel()
    return out, merged

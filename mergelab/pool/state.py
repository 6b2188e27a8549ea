"""State-dict I/O: lazy safetensors reading (one tensor at a time, no mmap, so peak memory
is what the caller holds), atomic writing, and strict loading with a named first mismatch."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.errors import CheckpointError
from mergelab.files import atomic_path

StateDict = dict[str, Tensor]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict backed by a .safetensors file.

    Each ``sd[key]`` reads exactly that tensor's bytes from disk into fresh memory; nothing
    is cached, so iterating over keys holds one tensor at a time. Used for experts so that
    merges stream over parameters instead of loading N whole models.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._offset = 8 + n
        self._header = header

    def __getitem__(self, key: str) -> Tensor:
        try:
            info = self._header[key]
        except KeyError:
            raise KeyError(f"{key!r} not in {self.path}") from None
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            with open(self.path, "rb") as f:
                f.seek(self._offset + start)
                got = f.readinto(memoryview(buf))
            if got != end - start:
                raise CheckpointError(f"{self.path} is truncated at tensor {key!r}")
        return out

    def read_into(self, key: str, out: Tensor, start: int = 0, fd: int | None = None) -> Tensor:
        """Elements ``start .. start + out.numel()`` of the flattened tensor ``key``, read into
        ``out`` (contiguous, the tensor's dtype) and returned. Streamed merges read
        cache-sized slices into memory they reuse: a fresh tensor per read costs a page
        fault per 4 KiB and a trip through main memory. ``fd``: this file opened by the
        caller (``os.open(sd.path, os.O_RDONLY)``) for many reads: positional reads, safe
        from several threads."""
        try:
            info = self._header[key]
        except KeyError:
            raise KeyError(f"{key!r} not in {self.path}") from None
        dtype, numel = _DTYPES[info["dtype"]], math.prod(info["shape"])
        if out.dtype != dtype or not out.is_contiguous() or not 0 <= start <= numel - out.numel():
            raise ValueError(
                f"read_into {key!r}: needs a contiguous {dtype} tensor of at most "
                f"{numel - start} elements from element {start}, got {out.dtype} with "
                f"{out.numel()}"
            )
        if not out.numel():
            return out
        # numpy has no bfloat16: its bytes as int16 (a view; the shorter way when it can)
        buf = memoryview((out.view(torch.int16) if out.dtype == torch.bfloat16 else out).numpy())
        at = self.data_offset(key) + start * out.element_size()
        if fd is None or not hasattr(os, "preadv"):  # (no preadv: Windows, some macOS)
            with open(self.path, "rb") as f:
                f.seek(at)
                got = f.readinto(buf)
        else:
            got = os.preadv(fd, [buf], at)
        if got != buf.nbytes:
            raise CheckpointError(f"{self.path} is truncated at tensor {key!r}")
        return out

    def values_at(self, key: str, index: np.ndarray, mapped: mmap.mmap) -> Tensor:
        """Elements at the flat positions ``index`` (int64) of tensor ``key``, in its dtype,
        gathered from ``mapped``: this whole file mapped by the caller
        (``mmap.mmap(fd, 0, access=mmap.ACCESS_READ)``). For a sparse sample of a large
        tensor: only the pages holding the positions are touched, and they are let go of
        again on return (``MADV_DONTNEED``), so sampling a whole file never holds it in this
        process's resident memory."""
        info = self._header[key]
        dtype = _DTYPES[info["dtype"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        start, end = (self._offset + at for at in info["data_offsets"])
        if end == start or not len(index):
            return torch.empty(0, dtype=dtype)
        raw = np.frombuffer(
            mapped, dtype=f"<u{itemsize}", count=(end - start) // itemsize, offset=start
        )
        picked = raw[index]  # a copy
        del raw  # nothing may export the mapping when it closes
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            lo = start - start % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return torch.from_numpy(picked.view(f"<i{itemsize}")).view(dtype)

    def data_offset(self, key: str) -> int:
        """Where tensor ``key``'s bytes start in the file."""
        return self._offset + self._header[key]["data_offsets"][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._header[key]["dtype"]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def __repr__(self) -> str:
        return f"LazyStateDict({str(self.path)!r}, {len(self)} tensors)"


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename): never a half-written file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata)


def check_compatible(
    expected: Mapping[str, Tensor], state: Mapping[str, Tensor], what: str = "checkpoint"
) -> None:
    """Raise a CheckpointError naming the first key whose presence or shape differs."""
    for k, ref in expected.items():
        if k not in state:
            raise CheckpointError(f"{what}: missing key {k!r} (expected shape {tuple(ref.shape)})")
        shape = state.shape(k) if isinstance(state, LazyStateDict) else tuple(state[k].shape)
        if tuple(shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{what}: key {k!r} has shape {tuple(shape)}, the backbone expects {tuple(ref.shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"{what}: unexpected key {extra[0]!r} (not a parameter of the backbone)"
        )


def check_finite(state: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{what}: key {k!r} holds non-finite values (NaN or inf)")


def load_into(
    module: nn.Module, state: Mapping[str, Tensor], what: str = "checkpoint"
) -> nn.Module:
    """Strictly load ``state`` into ``module`` after checking keys, shapes and finiteness."""
    check_compatible(module.state_dict(), state, what)
    tensors = {k: state[k] for k in state}
    check_finite(tensors, what)
    module.load_state_dict(tensors, strict=True)
    return module

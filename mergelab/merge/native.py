"""Fused C kernels for TIES' two streamed passes (``_ties_kernels.c``), compiled on first use;
also the reads of pass 1's sample (one ``pread`` per run, :func:`gather`).

The torch path does one op per sweep over a chunk (difference, |·|, compare, count, select,
Σ, ...), each reading and writing the chunk again; the kernels read the files themselves and
do the same float32 operations, in the same order, in one sweep per cache-sized block, so
the results are bit-identical (``make bench``: TIES ≈ 1.4× faster than on the torch ops).

The file is compiled once per machine and CPU with the C compiler Python itself was built
with (``$CC``, else ``cc``; ``-march=native`` where the compiler takes it) into
``$MERGELAB_CACHE/native`` (default ``~/.cache/mergelab/native``), under a name keyed by the
source, the compiler's version, the flags, the CPU's model and feature flags and the
platform; written atomically (several processes, e.g. DDP ranks, may compile at once) and
loaded with ctypes (which releases the GIL during a call: the worker threads run the kernels
in parallel). No compiler, a failed build or ``MERGELAB_NATIVE=0`` → :func:`kernels` returns
None and TIES uses the torch ops (the same results, slower), saying so once in the log.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_ties_kernels.c")
# -ffp-contract=off: no fused multiply-adds (they round once where the torch path rounds twice);
# -march=native: this CPU's vector width (the build is keyed by the CPU, see _cpu)
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NATIVE = ["-march=native"]

_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


def cache_dir() -> Path:
    """Where the compiled kernels live (the yaml's ``paths.cache_dir`` default)."""
    return Path(os.environ.get("MERGELAB_CACHE", "~/.cache/mergelab")).expanduser() / "native"


def compiler() -> list[str] | None:
    """The C compiler command (``$CC``, else the one Python was built with, else ``cc``), or
    None when it is not on the PATH."""
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc")
    cmd = shlex.split(cc)
    return cmd if cmd and shutil.which(cmd[0]) else None


def _cpu() -> str:
    """What the -march=native build depends on: the CPU's model and feature flags (a cache
    shared by several machines, e.g. a cluster's home directory, holds one build per CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        keep = ("model name", "flags", "features", "cpu part", "isa")
        lines = {ln.strip() for ln in info.splitlines() if ln.lower().startswith(keep)}
        return "\n".join(sorted(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: list[str]) -> Path:
    """The compiled kernels for this source, compiler and CPU: built on first use (with
    -march=native where the compiler takes it), written atomically."""
    version = subprocess.run(
        [*cc, "--version"], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), *version, *FLAGS, *NATIVE, _cpu(), platform.system()]
        ).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / f"ties_kernels-{key}.so"
    if lib.exists():
        return lib
    log.info("compiling the TIES kernels into %s", lib)
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        for extra in (NATIVE, []):  # a compiler without -march=native: its default target
            done = subprocess.run(
                [*cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if not done.returncode:
                break
        else:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"{cc[0]} exited {done.returncode}")
        os.replace(tmp, lib)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then TIES runs its torch path)."""
    if os.environ.get("MERGELAB_NATIVE", "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found ($CC, cc): TIES runs on torch ops (same results, slower)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning(
            "TIES kernels did not build (%s): TIES runs on torch ops (same results, slower)", err
        )
        return None
    lib.ml_ties_count.restype = _i32
    lib.ml_ties_count.argtypes = [_i32, _p, _p, _p, _i64, _p, _p, _p, _p, _i64, _p, _p, _i64]
    lib.ml_ties_merge.restype = _i64
    lib.ml_ties_merge.argtypes = [_i32, _p, _p, _p, _i64, _p, _f32, _i32, _p, _p, _p, _i64]
    lib.ml_gather.restype = _i32
    lib.ml_gather.argtypes = [_i32, _i64, _p, _p, _p]
    return lib


BLOCK = 1 << 14  # entries per source read and swept at a time, for 8 experts (see block)


def block(n_sources: int) -> int:
    """Entries per source and block for θ0 and T experts (``n_sources`` = T + 1): the
    blocks of all sources together stay at 9 × :data:`BLOCK` floats (576 KiB, within L2),
    however many experts there are."""
    return max(1, min(BLOCK, 9 * BLOCK // max(1, n_sources)))


def buffer_size(n_sources: int) -> int:
    """Floats of the ``buf`` a kernel call needs."""
    return n_sources * block(n_sources)


class Sources:
    """θ0 and the T experts on one slice of one parameter, as the kernels take them: per
    source a float32 file (its descriptor and the byte offset of the slice) or float32
    memory (the slice's address)."""

    def __init__(self, specs: list[tuple[int, int, int]]):
        self.fd = np.array([fd for fd, _, _ in specs], np.int32)
        self.off = np.array([off for _, off, _ in specs], np.int64)
        self.ptr = np.array([ptr for _, _, ptr in specs], np.uintp)
        self.args = (
            len(specs) - 1,
            self.fd.ctypes.data,
            self.off.ctypes.data,
            self.ptr.ctypes.data,
        )


def sources(items, lo: int) -> Sources | None:
    """The kernels' view of sources (objects with ``spec(lo)``: θ0 first, then the experts)
    from position ``lo`` on; None when one of them cannot be read by the kernels."""
    specs = [item.spec(lo) for item in items]
    return None if any(spec is None for spec in specs) else Sources(specs)


def gather(lib, fd: int, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """Runs of a float32 file read one after another (run i: ``counts[i]`` entries from
    byte ``offsets[i]``), with one ``pread`` each; None on a failed or short read."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    counts = np.ascontiguousarray(counts, np.int64)
    out = np.empty(int(counts.sum()), np.float32)
    rc = lib.ml_gather(fd, counts.size, offsets.ctypes.data, counts.ctypes.data, out.ctypes.data)
    return None if rc else out


def count(lib, src: Sources, m: int, lo: np.ndarray, hi: np.ndarray, cand: Tensor, buf: Tensor):
    """Pass 1 on m entries of every task: per task, how many |θt − θ0| lie below lo[t] and
    those in [lo[t], hi[t]] (views of ``cand``: T rows of at least m). None when a read fails
    or some value is not finite (the torch path then names the file or expert)."""
    T = len(lo)
    below, n = np.zeros(T, np.int64), np.zeros(T, np.int64)
    rc = lib.ml_ties_count(
        *src.args,
        m,
        lo.ctypes.data,
        hi.ctypes.data,
        below.ctypes.data,
        cand.data_ptr(),
        cand.shape[1],
        n.ctypes.data,
        buf.data_ptr(),
        block(len(src.fd)),
    )
    if rc:
        return None
    rows = cand.numpy()
    return [(int(below[t]), rows[t, : n[t]]) for t in range(T)]


def merge(
    lib, src: Sources, m: int, lam: np.ndarray, scaling: float, mean: bool, out: Tensor, buf: Tensor
):
    """Pass 2 on m columns: ``out`` ← the merged parameters. Returns (Σ sgn(Σ τ̂) over the
    columns, how many columns are undecided: Σ τ̂ = 0 with some entry kept — ``out`` is then
    incomplete), or None when a read fails."""
    gamma = _i64(0)
    undecided = lib.ml_ties_merge(
        *src.args,
        m,
        lam.ctypes.data,
        scaling,
        int(mean),
        out.data_ptr(),
        ctypes.byref(gamma),
        buf.data_ptr(),
        block(len(src.fd)),
    )
    return None if undecided < 0 else (int(gamma.value), int(undecided))

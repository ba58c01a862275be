"""Fused C kernels for the merge's memory-bound element-wise passes, compiled on first use.

Why: a TIES election in torch is ~10 ops per block, each a full pass with its own temporaries and call
overhead; the same expression in one C loop reads each input once (3.5x less time on 2 cores). The source is
`kernels.c` beside this file. It is compiled once per machine with the system C compiler (`$CC`, else `cc`)
into a user cache directory and loaded with ctypes, which releases the GIL, so a tensor's elements are split
across `torch.get_num_threads()` Python threads. Without a compiler, or with EVOMERGE_NO_KERNELS=1, `load()`
returns None and methods.py runs its torch reference, which tests keep bit-identical to the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC"]
SAMPLE = 1 << 13
"""Sample size of the selection's bracket: the band it leaves is ~6 / sqrt(SAMPLE) = 7% of a tensor (a larger
sample narrows it but costs more in random reads than numpy then saves)."""
MIN_SPLIT = 1 << 18
"""Elements below which a call runs on the calling thread: the split costs more than it saves."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared across machines stays valid)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _compile(out: Path, cc: str) -> None:
    """Compile to a temporary file and rename it into place, so concurrent processes never load half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, a failed build, or EVOMERGE_NO_KERNELS=1)."""
    if os.environ.get("EVOMERGE_NO_KERNELS", "") not in ("", "0"):
        return None
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"kernels-{key}.so"
    try:
        if not lib_path.exists():
            _compile(lib_path, cc)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("merge kernels unavailable, using torch: %s", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.elected_sum_f32.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int, ptr, i64, i64]
    lib.elected_sum_f32.restype = None
    f32 = ctypes.c_float
    lib.abs_band_f32.argtypes = [ptr, f32, f32, ptr, i64, ptr, i64, i64]
    lib.trim_abs_f32.argtypes = [ptr, f32, i64, i64, i64]
    lib.end_of_mth_tie_f32.argtypes = [ptr, i64, f32, i64]
    lib.end_of_mth_tie_f32.restype = i64
    lib.uniform_f32.argtypes = [ptr, ctypes.c_uint64, i64, i64]
    lib.dare_mask_f32.argtypes = [ptr, ptr, ctypes.c_uint64, f32, i64, i64]
    lib.keep_abs_band_f32.argtypes = [ptr, f32, i64, f32, i64, i64, i64]
    lib.abs_ranks_f32.argtypes = [ptr, i64, ptr, ptr, i64, i64]
    return lib


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="evomerge-kernel")


def _ranges(n: int) -> list[tuple[int, int]]:
    """[0, n) in up to torch.get_num_threads() ranges of whole 512-element blocks, one per thread."""
    threads = min(torch.get_num_threads(), max(1, n // MIN_SPLIT))
    step = (-(-n // threads) + 511) // 512 * 512
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _run(calls: list[Callable[[], None]]) -> None:
    """Run the calls, on the thread pool when there are several (each is one range of a kernel)."""
    if len(calls) == 1:
        calls[0]()
        return
    for f in [_pool(len(calls)).submit(c) for c in calls]:
        f.result()


def _split(fn: Callable[..., None], n: int, *args: object) -> None:
    """fn(*args, lo, hi) over [0, n), one range per thread (`_ranges`)."""
    _run([functools.partial(fn, *args, lo, hi) for lo, hi in _ranges(n)])


def elected_sum(deltas: Tensor, w: Tensor, consensus: str, normalize: bool) -> Tensor | None:
    """`methods.elected_sum` in one pass, or None where the kernel does not apply (no kernels, not a
    contiguous fp32 CPU tensor)."""
    lib = load()
    if lib is None or deltas.dtype != torch.float32 or deltas.device.type != "cpu" or deltas.dim() == 0:
        return None
    flat = deltas.reshape(deltas.shape[0], -1).contiguous()
    weights = w.reshape(-1).to(torch.float32).contiguous()
    k, n = flat.shape
    out = torch.empty(n, dtype=torch.float32)
    _split(lib.elected_sum_f32, n, flat.data_ptr(), k, n, weights.data_ptr(), int(consensus == "count"),
           int(normalize), out.data_ptr())  # fmt: skip
    return out.view(deltas.shape[1:])


def _usable(t: Tensor) -> ctypes.CDLL | None:
    lib = load()
    ok = t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
    return lib if ok else None


def kth_largest_abs(flat: Tensor, k: int) -> tuple[float, int, int] | None:
    """(t, #{|x| > t}, #{|x| == t}) for t the k-th largest |x| of a flat fp32 tensor, 1 <= k <= n; None where
    the kernels do not apply.

    Floyd-Rivest selection: the quantiles of a sample of |x| bracket the answer; one pass counts what lies
    below the bracket and copies what lies inside it (~7% of n); numpy selects in that band. That saves the
    copy and the passes over all of |x| that np.partition costs. A bracket that misses (a 6-sigma event) is
    retried as [0, inf): the whole of |x|, as before."""
    lib = _usable(flat)
    if lib is None:
        return None
    n = flat.numel()
    rank = n - k  # 0-based, ascending
    s = min(n, SAMPLE)
    margin = int(3 * s**0.5) + 1  # 6 standard deviations of the sample's quantile
    q = rank * s // n
    at = [i for i in (q - margin, q + margin) if 0 <= i < s]
    sample = np.abs(flat.numpy()[np.random.default_rng(0).integers(0, n, s)])
    if at:
        sample.partition(at)
    lo = float(sample[q - margin]) if q >= margin else 0.0
    hi = float(sample[q + margin]) if q + margin < s else math.inf
    values, below = _band(lib, flat, lo, hi)
    if not below <= rank < below + len(values):
        values, below = _band(lib, flat, 0.0, math.inf)
    t = np.partition(values, rank - below)[rank - below]
    above = n - below - len(values) + int(np.count_nonzero(values > t))
    return float(t), above, int(np.count_nonzero(values == t))


def _band(lib: ctypes.CDLL, flat: Tensor, lo: float, hi: float) -> tuple[np.ndarray, int]:
    """(the |x| in [lo, hi], in index order; #{|x| < lo}). Each thread's buffer could hold its whole range, but
    only the pages the band is written to are ever touched: memory grows with the band, not the tensor."""
    ranges = _ranges(flat.numel())
    band = torch.empty(flat.numel() + len(ranges), dtype=torch.float32)
    counts = torch.zeros(len(ranges), 2, dtype=torch.int64)
    _run([functools.partial(lib.abs_band_f32, flat.data_ptr(), lo, hi, band[a + i :].data_ptr(), b - a + 1,
                            counts[i].data_ptr(), a, b) for i, (a, b) in enumerate(ranges)])  # fmt: skip
    kept = [
        band[a + i : a + i + m].numpy() for i, ((a, _), m) in enumerate(zip(ranges, counts[:, 1].tolist()))
    ]
    return np.concatenate(kept), int(counts[:, 0].sum())


def keep_top_k_abs(flat: Tensor, k: int) -> bool:
    """In place, zero all but the k largest |x| of a flat fp32 tensor (equal values keep the lower index), as
    `methods.top_k_mask` does; False (and `flat` untouched) where the kernels do not apply."""
    found = kth_largest_abs(flat, k)
    if found is None:
        return False
    lib, n = load(), flat.numel()
    t, above, equal = found
    cut = n
    if above + equal > k:  # surplus ties: keep the first k - above of them
        cut = lib.end_of_mth_tie_f32(flat.data_ptr(), n, t, k - above) if k > above else 0
    _split(lib.trim_abs_f32, n, flat.data_ptr(), t, cut)
    return True


def lowest_cut(lib: ctypes.CDLL, flat: Tensor, m: int) -> tuple[float, int]:
    """(t, cut): the first m entries of a stable ascending sort of |x| are those with |x| < t, and those with
    |x| == t at indices below cut."""
    n = flat.numel()
    if m <= 0:
        return 0.0, 0
    if m >= n:
        return math.inf, n
    t, above, equal = kth_largest_abs(flat, n - m + 1)  # type: ignore[misc]  # usable: checked by the caller
    return t, lib.end_of_mth_tie_f32(flat.data_ptr(), n, t, m - (n - above - equal))


def keep_abs_band(flat: Tensor, m1: int, m2: int) -> bool:
    """In place, zero all but positions [m1, m2) of a stable ascending sort of |x| (`methods.lowest_m_mask`'s
    rule, twice), by two selections and one pass; False (and `flat` untouched) where the kernels do not apply."""
    lib = _usable(flat)
    if lib is None:
        return False
    (t1, cut1), (t2, cut2) = lowest_cut(lib, flat, m1), lowest_cut(lib, flat, m2)
    _split(lib.keep_abs_band_f32, flat.numel(), flat.data_ptr(), t1, cut1, t2, cut2)
    return True


def uniform(n: int, key: int) -> Tensor | None:
    """`methods.counter_uniform` in C, or None without the kernels."""
    lib = load()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.float32)
    _split(lib.uniform_f32, n, out.data_ptr(), key)
    return out


def abs_ranks(rows: Tensor) -> Tensor | None:
    """For each row of a [rows, len] fp32 tensor, the position of every entry in a stable ascending sort of the
    row's |x|, as floats (`methods.della_prune`'s ranks); None where the kernels do not apply or len >= 2^24.
    A radix sort per row: 5x faster than torch.argsort plus the scatter that inverts it."""
    lib = _usable(rows)
    if lib is None or rows.dim() != 2 or rows.shape[1] >= 1 << 24:
        return None
    n_rows, length = rows.shape
    out = torch.empty_like(rows)
    threads = min(torch.get_num_threads(), max(1, rows.numel() // MIN_SPLIT), n_rows)
    step = -(-n_rows // threads)
    scratch = torch.empty(threads, 4 * length, dtype=torch.int32)
    _run([functools.partial(lib.abs_ranks_f32, rows.data_ptr(), length, out.data_ptr(), scratch[i].data_ptr(), lo,
                            min(n_rows, lo + step)) for i, lo in enumerate(range(0, n_rows, step))])  # fmt: skip
    return out


def dare_mask(delta: Tensor, key: int, density: float) -> Tensor | None:
    """delta * (counter_uniform(delta.shape, key) < density) in one pass (`methods.bernoulli_prune`), or None
    where the kernels do not apply."""
    lib = _usable(delta)
    if lib is None:
        return None
    out = torch.empty_like(delta)
    _split(lib.dare_mask_f32, delta.numel(), delta.data_ptr(), out.data_ptr(), key, density)
    return out

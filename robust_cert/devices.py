"""Where and how a certification computes: the device (CUDA if present, else CPU) and the
number of CPU threads. No metric, policy or MLflow import: the loaders and the engine both
use it."""

from __future__ import annotations

import os

import torch

from robust_cert.errors import RobustCertError

#: Default intra-op threads on CPU. On small shared machines more threads can be far slower
#: (contention), and results may differ in the last bits between thread counts, so the
#: default is 1 and the count used is recorded in the certificate.
DEFAULT_THREADS = 1


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, else CPU. An explicit device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RobustCertError(f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N "
                              "or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise RobustCertError(f"device {device!r} is not supported: use cpu, cuda, cuda:N "
                              "or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobustCertError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RobustCertError(f"device {device!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (argument, else $ROBUST_CERT_THREADS, else 1)."""
    if threads is None:
        env = os.environ.get("ROBUST_CERT_THREADS", "")
        try:
            threads = int(env) if env else DEFAULT_THREADS
        except ValueError:
            raise RobustCertError(f"ROBUST_CERT_THREADS={env!r} is not an integer") from None
    if threads < 1:
        raise RobustCertError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def library_threads(threads: int):
    """A context manager limiting the thread pools of the native libraries loaded in this
    process — OpenMP runtimes (scikit-learn's, XGBoost's, LightGBM's, torch's) and BLAS
    (OpenBLAS, MKL) — to ``threads`` while it is open, and restoring them on exit
    (threadpoolctl). OpenMP limits apply to the calling thread, BLAS limits to the process.

    Why a certification of a black-box model needs it: its estimator calls its own
    thread pools, which by default take every core, whatever the certification's thread
    count. Which pool scikit-learn's OpenMP calls reach even depends on import order (loaded
    after torch, they bind to torch's runtime and follow ``torch.set_num_threads``; loaded
    first, they keep their own and use every core), and at the Square attack's query
    batches of a few dozen rows each parallel region costs more than it saves."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads))



#: The thresholds :func:`steady_cpu_allocator` sets: glibc's largest dynamic mmap threshold on
#: 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB) and the trim threshold glibc pairs
#: with it (twice that)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: environment variables by which a user configures glibc's allocator: set, they are obeyed
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_allocator: list[bool] = []  # the outcome of the first call, once made


def steady_cpu_allocator() -> bool:
    """Set glibc's malloc thresholds to the steady state it reaches by itself, once per
    process; True when they are set (now or by an earlier call).

    CPU tensors are malloc'ed. glibc serves a block above its mmap threshold (128 KiB at
    start) with fresh pages and unmaps it when freed; it raises the threshold to the size of
    such a freed block (up to 32 MiB) and its trim threshold to twice that, and gives the
    heap's free top back to the system above the trim threshold. A process that has run only
    small passes so far therefore returns its working memory after every pass and faults it
    in again, page by page, at the next: ResNet-18 width 16 on one thread, the surrogates
    metric on 32 points took 150,000-480,000 minor page faults (0.5-2 s of system time)
    where the same process with these thresholds takes about 22,000 (its heap growing once).
    Both are set to what glibc would reach after the first freed block of 32 MiB (which
    also fixes them: glibc adjusts them no further); blocks of 32 MiB and more are still
    unmapped when freed, and a heap top of more than 64 MiB is still given back.

    Only the allocator's bookkeeping changes, never a value computed. Nothing is set when
    libc is not glibc, or when the user configures glibc's allocator (:data:`MALLOC_ENV`).
    """
    if not _allocator:
        _allocator.append(_set_malloc_thresholds())
    return _allocator[0]


def _set_malloc_thresholds() -> bool:
    import ctypes

    if any(os.environ.get(name) for name in MALLOC_ENV):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # no confstr name, no libc symbol
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD))

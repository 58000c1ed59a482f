"""glibc's malloc thresholds at their steady state (``devices.steady_cpu_allocator``): a pass
that allocates and frees more than the dynamic trim threshold no longer faults its memory in
again at every repetition; the user's own allocator settings are obeyed; the engine sets it
on CPU. Each case runs in a fresh interpreter: the thresholds are process-wide, and glibc
adjusts them from the process's own history."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from robust_cert import devices

ROOT = Path(__file__).resolve().parents[1]
GLIBC = (getattr(os, "confstr_names", {}).get("CS_GNU_LIBC_VERSION") is not None
         and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"))
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")

#: 40 blocks of 1 MiB (above glibc's initial 128 KiB mmap threshold, 40 MiB in all: above the
#: trim threshold glibc reaches after freeing one of them, below the steady state's 64 MiB),
#: written and freed together, 6 times; prints the minor page faults of the last 5 passes
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "set":
    from robust_cert import devices
    print(devices.steady_cpu_allocator())
elif sys.argv[1] == "engine":
    import torch
    import robust_cert
    from robust_cert import engine
    net = torch.nn.Linear(4, 3)
    engine.device_capped(robust_cert.load_model(net, input_shape=(4,), device="cpu"), 16)
def one_pass():
    blocks = [np.empty(2**20, dtype=np.uint8) for _ in range(40)]
    for b in blocks:
        b.fill(1)  # every page written
    del blocks
one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES_PER_PASS = 40 * 2**20 // os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 10_240


def probe(mode: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in devices.MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)
    return out.stdout.split()


@needs_glibc
def test_without_it_every_pass_faults_its_memory_in_again():
    """The premise: glibc's dynamic thresholds give the 40 MiB back after each pass."""
    (faults,) = probe("none")
    assert int(faults) >= 5 * PAGES_PER_PASS * 0.9


@needs_glibc
@pytest.mark.parametrize("mode", ["set", "engine"])
def test_at_the_steady_state_later_passes_reuse_the_heap(mode):
    *flag, faults = probe(mode)
    assert flag in ([], ["True"])
    # the heap keeps the 40 MiB: a handful of pages at most, against 5 × 10,240 without
    assert int(faults) < 0.02 * 5 * PAGES_PER_PASS


@needs_glibc
@pytest.mark.parametrize("name", devices.MALLOC_ENV)
def test_the_users_allocator_settings_are_obeyed(name):
    value = "glibc.malloc.check=0" if name == "GLIBC_TUNABLES" else "131072"
    flag, faults = probe("set", **{name: value})
    assert flag == "False"
    if name != "GLIBC_TUNABLES":  # a 128 KiB threshold, fixed: every pass faults again
        assert int(faults) >= 5 * PAGES_PER_PASS * 0.9


def test_thresholds_are_glibcs_own_maximum():
    """32 MiB is glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (4 · 1 MiB · sizeof(long)); the
    trim threshold is what glibc pairs with a threshold: twice it."""
    assert devices.MMAP_THRESHOLD == 4 * 2**20 * 8
    assert devices.TRIM_THRESHOLD == 2 * devices.MMAP_THRESHOLD

"""scoretk.execution.cpu_memory: CPU runs keep freed memory for reuse instead of faulting it back in.

Each check runs in a fresh interpreter: malloc's settings belong to the whole process."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Rounds of 4 MiB buffers, allocated, written and freed together, as a training step does with
# its activations. The process starts out returning every freed buffer to the kernel (glibc's
# defaults do that for some sizes and heap layouts, not all: they adapt as they go), so each
# round faults its pages in again, unless keep_freed_memory() overrides that.
PAGE_FAULTS = """
import ctypes, resource, sys, torch
from scoretk.execution.cpu_memory import keep_freed_memory
mallopt = ctypes.CDLL(None).mallopt
mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD: map every buffer of 64 KiB or more afresh
mallopt(-1, 0)  # M_TRIM_THRESHOLD: hand any free heap top back
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def round_():
    bufs = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]
    del bufs
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], env=environ, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_is_reused_without_page_faults():
    _, faults_returned = _run("returned")
    kept, faults_kept = _run("keep")
    assert kept == "True"
    assert faults_returned > 5 * 8 * 1024 * 0.9  # every 4 KiB page, every round
    assert faults_kept < faults_returned / 20


def test_the_environment_s_own_malloc_settings_win():
    kept, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"

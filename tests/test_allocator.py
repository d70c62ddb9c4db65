"""`keep_freed_memory`: what a step frees is reused by the next one, without fresh (zero-filled) pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf.allocator import USER_SETTINGS, keep_freed_memory

REPO = Path(__file__).resolve().parents[1]

# Ten "steps" in a fresh process, each allocating, filling and freeing four tensors of a size that varies as a
# training step's shapes do (18-26 MB); per step: the page faults (fresh pages the kernel zero-fills), the bytes
# malloc had mapped with mmap while the tensors were alive, and the size of its heap after the step.
STEPS = """
import ctypes, json, resource, sys, torch
from minirlhf.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
class MallInfo(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo.restype = MallInfo
steps = []
for mb in [18, 24, 20, 26, 22] * 2:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mb * 2**18) for _ in range(4)]
    mapped = mallinfo().hblkhd
    del blocks
    steps.append({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "mapped": mapped,
                  "heap": mallinfo().arena})
print(json.dumps({"applied": applied, "steps": steps}))
"""


def run_steps(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, env=env, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("not glibc >= 2.33: no mallinfo2 to read the heap with")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_freed_memory_is_reused_without_new_pages():
    kept = run_steps("keep")
    if not kept["applied"]:
        pytest.skip("not glibc's malloc: nothing to set")
    steps = kept["steps"]
    pages = 4 * 26 * 2**20 // 4096  # the largest step's tensors, in 4 KB pages
    assert len({s["mapped"] for s in steps}) == 1, steps  # no block of these sizes was mmapped
    assert all(b["heap"] >= a["heap"] for a, b in zip(steps, steps[1:])), steps  # the heap never gave memory back
    first_round, second_round = (sum(s["faults"] for s in part) for part in (steps[:5], steps[5:]))
    assert first_round > pages  # the first steps take their memory from the kernel ...
    assert second_round < first_round // 2, steps  # ... the same sizes again mostly reuse it
    # the default: a block above malloc's moving threshold is mapped afresh on each allocation, unmapped on free
    default = run_steps("default")["steps"]
    assert max(s["mapped"] for s in default) > steps[0]["mapped"] + 4 * 18 * 2**20, default


def test_the_users_own_malloc_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_memory() is False

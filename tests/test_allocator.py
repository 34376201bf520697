"""The command line's allocator setting: big blocks freed by one step are reused by the next."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

# Allocate and free a 256 MB tensor four times; print whether the setting took effect and the
# fewest page faults any later round paid (a round that reuses freed memory pays none).
PROBE = """
import resource, sys, torch
from skipgpt.allocator import keep_freed_memory
on = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(on, min(faults[1:]))
"""


def probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting")
def test_freed_blocks_are_reused_without_page_faults():
    on, faults = probe("keep")
    off, default_faults = probe("default")
    assert on and not off
    assert default_faults > 60_000  # glibc's default: every round maps 256 MB afresh
    assert faults < default_faults // 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting")
@pytest.mark.parametrize("env", [{"SKIPGPT_MALLOC": "default"}, {"MALLOC_ARENA_MAX": "2"}])
def test_the_users_own_setting_wins(env):
    on, faults = probe("keep", **env)
    assert not on and faults > 60_000

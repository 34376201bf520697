"""Pause points: where the fault tests (tests/test_faults.py) SIGKILL a real run.

Inert unless ``SKIPGPT_TEST_PAUSE`` is set. With ``SKIPGPT_TEST_PAUSE=POINT`` (or ``POINT@N``, the
N-th time the process gets there) and ``SKIPGPT_TEST_PAUSE_MARKER=FILE``, the run creates FILE and
sleeps when it reaches POINT, so a test can kill it at exactly that moment. The points:

``step``              before an optimizer step starts (the previous one is logged and, if due, checkpointed)
``checkpoint-write``  inside a checkpoint write: weights and optimizer state staged, trainer state and the
                      rename into place not yet done
``calibration``       inside threshold calibration, after its first full pass
``compare-row``       in ``skipgpt compare``, after a row is written and before the next one starts
``compare-eval``      in ``skipgpt compare``, after a row's evaluation set is scored and kept, before the next
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "SKIPGPT_TEST_PAUSE"
MARKER_ENV = "SKIPGPT_TEST_PAUSE_MARKER"
_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
        time.sleep(600)  # the test kills the process long before this ends

"""A scoreboard row's finished evaluation parts (each perplexity set, each zero-shot task), kept
under the row's ``partial/`` until its ``row.json`` is written: a row's evaluation is half an hour
on two CPU cores, and a sitting that stops during it keeps what finished. The parts belong to one
model; a row whose model was made again (retrained, re-pruned, a changed router set) starts over.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..files import read_kept, safe_name, write_json, write_text
from ..pause import pause_point

PARTIAL_DIR = "partial"


def partial_dir(row_dir: Path, made_from: str) -> Path:
    """The row's partial directory for the model ``made_from`` names; parts of another are dropped."""
    partial = row_dir / PARTIAL_DIR
    mark = partial / "model.txt"
    if partial.exists() and (not mark.is_file() or mark.read_text() != made_from):
        shutil.rmtree(partial)
    if not mark.is_file():
        write_text(mark, made_from)
    return partial


def digest(*paths: Path) -> str:
    """Which model a row's parts belong to: the bytes of the files that made it."""
    return " ".join(f"{p.name}:{hashlib.sha1(p.read_bytes()).hexdigest()}" for p in paths)


def kept_or_scored(partial: Path, name: str, setting: dict[str, Any], score: Callable[[], Any]) -> dict[str, Any]:
    """``{"result", "wall_s"}`` of evaluation set ``name`` (given by name or path): the kept one
    where it was scored with the same ``setting``, otherwise scored now and kept."""
    path = partial / f"ppl_{safe_name(Path(name).name)}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.json"
    saved = read_kept(path, setting)
    if saved is None:
        tick = time.perf_counter()
        result = score()
        saved = {"setting": setting, "result": result, "wall_s": time.perf_counter() - tick}
        write_json(path, saved)
        pause_point("compare-eval")
    return saved

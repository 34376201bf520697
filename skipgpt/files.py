"""Writing files so that a crash never leaves half of one under its final name."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import SkipGPTError


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same directory and rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would keep results from other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_kept(path: Path, setting: dict[str, Any]) -> dict[str, Any] | None:
    """A result kept by an earlier run (``write_json`` of a dict holding ``"setting"``), or None
    where there is none or it was made under another setting (then it is redone and overwritten)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("setting") == setting else None


def safe_name(text: str) -> str:
    """``text`` (a name, a path's last part) as a file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def cache_dir() -> Path:
    """Where skipgpt keeps what it builds once (converted models, the engine's cost model):
    ``$SKIPGPT_CACHE``, else ``~/.cache/skipgpt``."""
    path = Path(os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt").expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SkipGPTError(
            f"Cannot create the skipgpt cache directory {path}: {e}. "
            "Set SKIPGPT_CACHE to a writable directory."
        ) from e
    return path


def write_result(stem: str | Path, data: Any, markdown: str) -> None:
    """A result as ``STEM.json`` beside its table ``STEM.md`` (a stem may hold dots: no suffix logic)."""
    stem = Path(stem)
    write_json(stem.with_name(stem.name + ".json"), data)
    write_text(stem.with_name(stem.name + ".md"), markdown)

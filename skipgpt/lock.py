"""One writer per output directory.

Two runs on the same ``--out`` would interleave their checkpoints, logs and results, so the second
is refused. The lock is ``OUT/.skipgpt.lock``, created atomically together with its content (the
holder's pid, host, command and start time) so that the refusal can say who holds it. A process
killed with SIGKILL cannot remove its lock; one whose process no longer exists on this host is
taken over. Taking the lock also proves that ``--out`` can be written, before any work starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import SkipGPTError

LOCK_NAME = ".skipgpt.lock"


@contextlib.contextmanager
def output_lock(out: Path, command: str) -> Iterator[None]:
    """Hold ``out``'s lock (creating ``out``) for the block; a directory it created and that is
    still empty afterwards is removed again.

    Under ``accelerate launch`` every process runs the command; they are one run, so only the
    first (RANK 0) takes the lock.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    created = _make_dir(out)
    lock = out / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        _acquire(lock, mine)
        try:
            yield
        finally:
            _release(lock, mine)
    finally:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else was written


def _make_dir(out: Path) -> bool:
    if out.exists() and not out.is_dir():
        raise SkipGPTError(f"--out {out} is a file, not a directory; pick another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SkipGPTError(f"cannot create --out {out} ({err.strerror or err}); pick a directory you can write to") from None
    return created


def _acquire(lock: Path, mine: str) -> None:
    for _ in range(3):  # a lock can be released or taken over between two looks at it
        if _create(lock, mine):
            return
        try:
            held_text = lock.read_text()
        except FileNotFoundError:
            continue
        held = _parse(held_text)
        if held is None or _alive(held):
            raise SkipGPTError(_refusal(lock, held))
        _take_over(lock, held_text)
    raise SkipGPTError(f"{lock.parent} is being locked and unlocked by other skipgpt runs; wait for them or pick another --out")


def _create(lock: Path, content: str) -> bool:
    """Write ``content`` beside and hard-link it into place: the lock never exists half-written,
    and the link fails if another process holds it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f"{LOCK_NAME}.")
    except OSError as err:
        raise SkipGPTError(f"cannot write to --out {lock.parent} ({err.strerror or err}); pick a directory you can write to") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        held = json.loads(text)
        return held if isinstance(held, dict) and isinstance(held.get("pid"), int) else None
    except ValueError:
        return None


def _alive(held: dict[str, Any]) -> bool:
    """Whether the holder may still run: only a pid on this host can be checked."""
    if held.get("host") != socket.gethostname():
        return True
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _take_over(lock: Path, stale_text: str) -> None:
    """Move a dead holder's lock aside. If another process replaced it in the meantime (it took
    the lock over first), that live lock is put back."""
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    try:
        if aside.read_text() != stale_text:
            with contextlib.suppress(FileExistsError):
                os.link(aside, lock)
    finally:
        aside.unlink()


def _release(lock: Path, mine: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if lock.read_text() == mine:
            lock.unlink()


def _refusal(lock: Path, held: dict[str, Any] | None) -> str:
    out = lock.parent
    if held is None:
        return (f"{out} is locked by another skipgpt run ({lock} is unreadable); wait for it or pick another --out "
                f"(if no run is writing there, delete {lock})")
    return (f"{out} is being written by process {held['pid']} on {held.get('host')} ({held.get('command')}, started "
            f"{held.get('started')}); wait for it or pick another --out (if that process is not a skipgpt run, delete {lock})")

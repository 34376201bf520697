"""Atomic, resumable training checkpoints.

A checkpoint is a directory written under a temporary name and renamed into place, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
It holds what an uninterrupted run would still have in memory: trainable weights, optimizer
and scheduler state, the step (which fixes the data position) and every RNG.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _paths(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / CHECKPOINT_DIR, out_dir / f".{CHECKPOINT_DIR}.tmp", out_dir / f".{CHECKPOINT_DIR}.old"


def staging_dir(out_dir: Path) -> Path:
    """Where every process writes its part before :func:`commit` (rank files side by side)."""
    _, tmp, _ = _paths(out_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_rank_state(out_dir: Path, rank: int) -> None:
    torch.save(rng_state(), staging_dir(out_dir) / f"rng_{rank}.pt")


def write_main_state(
    out_dir: Path, weights: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, trainer_state: dict[str, Any]
) -> None:
    tmp = staging_dir(out_dir)
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))


def commit(out_dir: Path) -> None:
    """Swap the staged checkpoint in: old -> .old, staged -> checkpoint, drop .old."""
    final, tmp, old = _paths(out_dir)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def find(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (the .old one survives a crash between the two renames)."""
    final, _, old = _paths(out_dir)
    for path in (final, old):
        if (path / "trainer_state.json").is_file():
            return path
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Step, elapsed time and fingerprint (the run's configuration) of a checkpoint."""
    return json.loads((path / "trainer_state.json").read_text())


def load(path: Path, rank: int) -> dict[str, Any]:
    return {
        "weights": load_file(str(path / "weights.safetensors")),
        "optim": torch.load(path / "optim.pt", weights_only=False),
        "trainer_state": load_trainer_state(path),
        "rng": torch.load(path / f"rng_{rank}.pt", weights_only=False),
    }


def remove(out_dir: Path) -> None:
    for path in _paths(out_dir):
        if path.exists():
            shutil.rmtree(path)

"""Atomic, resumable training checkpoints that load without running code.

A checkpoint is a directory written under a temporary name and renamed into place, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
It holds what an uninterrupted run would still have in memory: trainable weights, optimizer
and scheduler state, the step (which fixes the data position) and every RNG.

Nothing in it is a pickle: a run directory may come from someone else, and unpickling it would
run whatever code it names. Tensors go into safetensors files; everything else (step counts,
hyper-parameters, Python's and numpy's RNG states) is JSON, kept in the safetensors header.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import SkipGPTError
from ..pause import pause_point

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "weights.safetensors"
OPTIM_NAME = "optim.safetensors"
# Files of the pickle-based format skipgpt wrote before: recognised only to refuse them.
PICKLE_NAMES = ("optim.pt", "rng_*.pt")


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


# ---- state trees <-> safetensors + JSON ---------------------------------------------------------
# A state dict is a tree of dicts, lists, tuples, numbers, strings, tensors and numpy arrays. Tensors
# are stored by their path in the tree; the tree itself becomes JSON, with the few things JSON cannot
# say (tuples, non-string dict keys, tensors, arrays) written as marker objects.

_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        return np.asarray(value[_ARRAY], dtype=value["dtype"])
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {k: _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _save_tree(tree: Any, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, path.stem, tensors)
    save_file(tensors, str(path), metadata={"skipgpt_state": json.dumps(encoded)})


def _load_tree(path: Path) -> Any:
    with safe_open(str(path), framework="pt") as f:
        encoded = json.loads(f.metadata()["skipgpt_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(encoded, tensors)


# ---- the checkpoint directory -------------------------------------------------------------------


def _paths(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / CHECKPOINT_DIR, out_dir / f".{CHECKPOINT_DIR}.tmp", out_dir / f".{CHECKPOINT_DIR}.old"


def _rank_name(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def discard_staging(out_dir: Path) -> None:
    """Drop what a killed run left half-staged, so that none of it slips into the next commit."""
    _, tmp, _ = _paths(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)


def staging_dir(out_dir: Path) -> Path:
    """Where every process writes its part before :func:`commit` (rank files side by side)."""
    _, tmp, _ = _paths(out_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_rank_state(out_dir: Path, rank: int) -> None:
    _save_tree(rng_state(), staging_dir(out_dir) / _rank_name(rank))


def write_main_state(
    out_dir: Path, weights: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, trainer_state: dict[str, Any]
) -> None:
    """``trainer_state.json`` goes last: a staged directory without it is incomplete."""
    tmp = staging_dir(out_dir)
    save_file(weights, str(tmp / WEIGHTS_NAME))
    _save_tree({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM_NAME)
    pause_point("checkpoint-write")
    (tmp / STATE_NAME).write_text(json.dumps(trainer_state, indent=2))


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
    """The newest complete checkpoint (the .old one survives a crash between the two renames).

    A checkpoint in the old pickle format is refused here, before anything else looks at it.
    """
    final, _, old = _paths(out_dir)
    for path in (final, old):
        if (path / STATE_NAME).is_file():
            if any(next(path.glob(pattern), None) for pattern in PICKLE_NAMES):
                raise SkipGPTError(
                    f"{path} was written by an older skipgpt in a format that can run code when loaded, so it is "
                    f"not loaded; delete {path} and start the run again (or finish it with the skipgpt version "
                    "that started it, if you trust whoever wrote the directory)"
                )
            return path
    return None


def _damaged(path: Path, err: Exception) -> SkipGPTError:
    return SkipGPTError(f"the checkpoint {path} is damaged ({err}); delete it and start the run again")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Step, elapsed time and fingerprint (the run's configuration) of a checkpoint."""
    try:
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as err:
        raise _damaged(path, err) from None


def load(path: Path, rank: int) -> dict[str, Any]:
    try:
        return {
            "weights": load_file(str(path / WEIGHTS_NAME)),
            "optim": _load_tree(path / OPTIM_NAME),
            "trainer_state": load_trainer_state(path),
            "rng": _load_tree(path / _rank_name(rank)),
        }
    except SkipGPTError:
        raise
    except Exception as err:  # safetensors, JSON and a missing file each raise their own type
        raise _damaged(path, err) from None


def remove(out_dir: Path) -> None:
    for path in _paths(out_dir):
        if path.exists():
            shutil.rmtree(path)

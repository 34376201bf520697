"""Pruned models on disk, PEFT-style: the plan as JSON and only the tensors a method changed
(LaCo's merged layers, SliceGPT's rotated ones); everything else is reloaded from the base
model, so a layer-drop result is a few hundred bytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SkipGPTError
from ..files import write_json
from ..identity import source_name, weights_fingerprint
from .registry import get_method
from .structure import PrunePlan

PLAN_NAME = "prune_config.json"
WEIGHTS_NAME = "pruned.safetensors"


def save_pruned(model: nn.Module, plan: PrunePlan, out_dir: str | Path) -> Path:
    """Write the plan (and the tensors the method changed) atomically into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The base as it was loaded: the plan's method has changed the weights since.
    plan.base_model = plan.base_model or source_name(model)
    plan.base_fingerprint = plan.base_fingerprint or getattr(model, "skipgpt_fingerprint", "") or ""
    if plan.changed:
        state = model.state_dict()
        missing = [n for n in plan.changed if n not in state]
        if missing:
            raise SkipGPTError(f"plan lists changed tensors the model lacks: {missing[:3]}")
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file({n: state[n].detach().contiguous().cpu() for n in plan.changed}, str(tmp))
        tmp.replace(out / WEIGHTS_NAME)
    write_json(out / PLAN_NAME, plan.to_dict())
    return out


def read_plan(path: str | Path) -> PrunePlan:
    file = Path(path) / PLAN_NAME
    if not file.is_file():
        raise SkipGPTError(f"{path} is not a pruned model directory (no {PLAN_NAME}); make one with 'skipgpt prune'")
    return PrunePlan.from_dict(json.loads(file.read_text()))


def load_pruned(model: nn.Module, path: str | Path) -> PrunePlan:
    """Apply a saved plan to the base model it was made from, in place; refuse any other (by its
    weights' fingerprint: layer indices of another model of the same depth would apply silently)."""
    plan = read_plan(path)
    ours = weights_fingerprint(model) if plan.base_fingerprint else None
    if ours is not None and ours != plan.base_fingerprint:
        raise SkipGPTError(f"{path} was made from {plan.base_model!r} and this model's weights are not that model's "
                           f"(fingerprint {ours}, the plan's {plan.base_fingerprint}): load it with --model {plan.base_model} "
                           "(or leave --model out: --pruned loads the model its plan was made from)")
    get_method(plan.method).restructure(model, plan)
    if plan.changed:
        weights = load_file(str(Path(path) / WEIGHTS_NAME))
        params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        for name, value in weights.items():
            if name not in params:
                raise SkipGPTError(f"{path}: tensor {name} does not exist in the restructured model (wrong base model?)")
            target = params[name]
            if target.shape != value.shape:
                raise SkipGPTError(f"{path}: tensor {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
    model.skipgpt_prune_plan = plan
    return plan

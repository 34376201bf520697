"""Physically removing modules from a decoder.

A static baseline ends as a :class:`PrunePlan`: which (layer, branch) modules are gone, plus
whatever its method needs to rebuild its structure (``extra``). Removed modules are deleted,
not masked: their weights leave the state dict and a layer whose two branches are gone leaves
the layer stack. save_load.py writes the plan and reloads it onto a base model.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SkipGPTError
from ..routing.adapters import KINDS, get_adapter
from ..routing.surgery import branch_parameter_counts, has_routers


@dataclass
class PrunePlan:
    method: str
    target_ratio: float
    removed: list[tuple[int, str]] = field(default_factory=list)  # (original layer index, "attn"|"mlp")
    achieved_ratio: float = 0.0  # decoder-layer parameters removed / decoder-layer parameters before
    base_model: str = ""  # the name the base was loaded by (a .gguf file itself, not its folder)
    base_fingerprint: str = ""  # skipgpt/identity.py: which weights the plan applies to
    changed: list[str] = field(default_factory=list)  # parameter names saved in pruned.safetensors
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific structure and diagnostics

    def to_dict(self) -> dict[str, Any]:
        return {"format": "skipgpt-pruned", "version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        data["removed"] = [(int(i), str(k)) for i, k in data.get("removed", [])]
        return cls(**data)


def decoder_parameter_count(model: nn.Module) -> int:
    """Parameters of the decoder layers: the yardstick of every ratio in this package."""
    return sum(p.numel() for layer in get_adapter(model).decoder_layers(model) for p in layer.parameters())


def module_parameter_counts(model: nn.Module) -> torch.Tensor:
    """[2L] parameters of each (layer, branch) module, norms included, as routers count them."""
    return branch_parameter_counts(model, get_adapter(model))


def _pruned_layer_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The pre-norm residual layer with only the branches it still has."""
    adapter = get_adapter(self.skipgpt_model_type)
    for kind in KINDS:
        norm, module, post_norm = adapter.branch(self, kind)
        if module is None:
            continue
        out = norm(hidden_states)
        out = module(hidden_states=out, **kwargs)[0] if kind == "attn" else module(out)
        hidden_states = hidden_states + (post_norm(out) if post_norm is not None else out)
    return hidden_states


def remove_modules(model: nn.Module, removed: list[tuple[int, str]]) -> None:
    """Delete the given (layer, branch) modules in place; ``removed`` uses the layer indices of
    the unpruned model. Layers left empty are taken out of the stack, and the remaining
    attention modules are renumbered so that KV caches stay dense and position counting
    (which reads cache layer 0) stays right."""
    if has_routers(model):
        raise SkipGPTError("remove routers (detach_routers) before pruning; routed and pruned models are separate baselines")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    gone = {(int(i), k) for i, k in removed}
    bad = [(i, k) for i, k in gone if not 0 <= i < len(layers) or k not in KINDS]
    if bad:
        raise SkipGPTError(f"cannot remove {bad}: the model has layers 0..{len(layers) - 1} with branches {KINDS}")
    config = model.config.get_text_config()
    types_before = list(getattr(config, "layer_types", None) or [])
    kept: list[nn.Module] = []
    for index, layer in enumerate(layers):
        drop = [k for k in KINDS if (index, k) in gone]
        if len(drop) == len(KINDS):
            continue
        for kind in drop:
            for name in (adapter.attn_norm, adapter.attn, adapter.attn_post_norm) if kind == "attn" else (
                adapter.mlp_norm, adapter.mlp, adapter.mlp_post_norm
            ):
                if name:
                    setattr(layer, name, None)
        if drop:
            layer.skipgpt_model_type = model.config.model_type
            layer.forward = types.MethodType(_pruned_layer_forward, layer)
        layer.skipgpt_original_index = getattr(layer, "skipgpt_original_index", index)
        kept.append(layer)
    if not kept:
        raise SkipGPTError("the plan removes every layer")
    parent, name = adapter.layers.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, nn.ModuleList(kept))
    with_attn = [layer for layer in kept if getattr(layer, adapter.attn) is not None]
    for new_index, layer in enumerate(with_attn):
        getattr(layer, adapter.attn).layer_idx = new_index
    config.num_hidden_layers = len(kept)
    if types_before:  # cache layer j serves the j-th remaining attention: give it that layer's type
        kinds = [types_before[layer.skipgpt_original_index] for layer in with_attn]
        rest = [types_before[layer.skipgpt_original_index] for layer in kept if layer not in with_attn]
        config.layer_types = kinds + rest


def removed_ratio(removed: list[tuple[int, str]], counts: torch.Tensor) -> float:
    """Share of decoder-layer parameters in the removed modules ([2L] counts of the base model)."""
    index = [2 * i + KINDS.index(k) for i, k in removed]
    return float(counts[index].sum() / counts.sum()) if index else 0.0


def select_by_importance(importance: torch.Tensor, counts: torch.Tensor, target: float) -> list[int]:
    """Least important units first until their parameters reach ``target`` of the total; the
    last unit is taken only if that lands closer to the target (granularity is one unit)."""
    share = counts.double() / counts.double().sum()
    chosen, done = [], 0.0
    for unit in importance.argsort().tolist():
        if abs(done + float(share[unit]) - target) > abs(done - target):
            break
        chosen.append(unit)
        done += float(share[unit])
    return chosen

"""Width pruning baselines (paper section 4.2, appendix C): SliceGPT (slicegpt.py) and
LLM-Pruner (llm_pruner.py). Both keep every layer and make the matrices inside them smaller;
nothing is masked. This module holds what they share: model checks and in-place resizing of
linear layers, and the plan bookkeeping.

SliceGPT supports the llama family (llama, mistral, qwen2, qwen3); LLM-Pruner also Gemma 2/3.
Torch-Pruning, the library LLM-Pruner is built on, is not used: building its dependency groups
did not finish on a tiny GQA Llama (docs/baselines-width.md), so the groups are written out here.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..devices import input_device
from ..errors import SkipGPTError
from ..routing.adapters import get_adapter
from ..routing.surgery import has_routers
from .structure import PrunePlan, decoder_parameter_count

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
ATTN_IN, ATTN_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj"
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), "down_proj"




def device_of(model: nn.Module) -> torch.device:
    return input_device(model)


def check_model(model: nn.Module, method: str, types_ok: tuple[str, ...]) -> None:
    get_adapter(model)  # unknown architectures fail with the list of supported ones
    model_type = model.config.model_type
    if model_type not in types_ok:
        raise SkipGPTError(
            f"{method} is implemented for the llama family ({', '.join(types_ok)}), not {model_type!r}: "
            "Gemma 2/3 normalise each branch's output before the residual add, so the RMSNorm scales "
            "cannot be folded and the residual stream cannot be rotated (SliceGPT does not support Gemma either)"
            if method == "slicegpt"
            else f"{method} supports {', '.join(types_ok)}, not {model_type!r}"
        )
    if has_routers(model):
        raise SkipGPTError("remove routers (detach_routers) before pruning; routed and pruned models are separate baselines")
    if getattr(model, "skipgpt_prune_plan", None) is not None:
        raise SkipGPTError(f"this model is already pruned ({model.skipgpt_prune_plan.method}); start from the base model")
    for layer in get_adapter(model).decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        names = [n for n in (*ATTN_IN, ATTN_OUT) if not isinstance(getattr(attn, n, None), nn.Linear)]
        names += [n for n in (*MLP_IN, MLP_OUT) if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if names:
            raise SkipGPTError(f"{method}: expected separate nn.Linear projections, missing {names} in {model_type}")


def shrink_linear(linear: nn.Linear, rows: Any = None, cols: Any = None) -> None:
    """Keep only ``rows`` (output features) and ``cols`` (input features) of a linear layer:
    new, smaller parameters, so the removed weights really leave the model."""
    with torch.no_grad():
        weight = linear.weight
        if rows is not None:
            weight = weight[rows]
        if cols is not None:
            weight = weight[:, cols]
        grad = linear.weight.requires_grad
        linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=grad)
        if linear.bias is not None and rows is not None:
            linear.bias = nn.Parameter(linear.bias[rows].detach().clone().contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = linear.weight.shape


def set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    grad = linear.weight.requires_grad
    dtype = linear.weight.dtype
    linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = linear.weight.shape


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def finish(model: nn.Module, plan: PrunePlan, before: int, total_before: int, start: float) -> PrunePlan:
    after = decoder_parameter_count(model)
    total_after = total_params(model)
    plan.achieved_ratio = 1 - after / before
    plan.base_model = str(getattr(model.config, "_name_or_path", ""))
    plan.extra.update(
        decoder_params_before=before,
        decoder_params_after=after,
        total_params_before=total_before,
        total_params_after=total_after,
        total_ratio=1 - total_after / total_before,
        prune_wall_s=round(time.perf_counter() - start, 2),
    )
    model.skipgpt_prune_plan = plan
    return plan

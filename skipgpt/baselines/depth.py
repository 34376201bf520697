"""Depth pruning baselines: whole layers (ShortGPT, Shortened LLaMA, LaCo) or single attention
and MLP modules (Joint Layer Drop) are removed, ranked on calibration text.

Every ranking is computed on ``calib_ids`` (held-out training text: never evaluation text),
and every method stops at the parameter ratio closest to the request its granularity allows.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..devices import input_device
from ..next_token import sequence_nll
from ..routing.adapters import KINDS, get_adapter
from ..routing.surgery import attach_routers, detach_routers
from ..training.importance import module_importance
from .registry import StaticMethod, register
from .structure import (
    PrunePlan,
    decoder_parameter_count,
    module_parameter_counts,
    remove_modules,
    removed_ratio,
    select_by_importance,
)


def _device(model: nn.Module) -> torch.device:
    return input_device(model)


def _layer_counts(model: nn.Module) -> torch.Tensor:
    return module_parameter_counts(model).view(-1, len(KINDS)).sum(-1)


def _whole_layers(layers: list[int]) -> list[tuple[int, str]]:
    return [(i, k) for i in sorted(layers) for k in KINDS]


def _finish(model: nn.Module, method: str, ratio: float, removed: list[tuple[int, str]], extra: dict, start: float,
            changed: Callable[[], list[str]] | None = None) -> PrunePlan:
    counts = module_parameter_counts(model)
    before = decoder_parameter_count(model)
    remove_modules(model, removed)
    plan = PrunePlan(
        method=method, target_ratio=ratio, removed=removed, achieved_ratio=removed_ratio(removed, counts),
        changed=changed() if changed else [],
        extra={**extra, "decoder_params_before": before, "decoder_params_after": decoder_parameter_count(model),
               "prune_wall_s": round(time.perf_counter() - start, 2)},
    )
    model.skipgpt_prune_plan = plan
    return plan


@torch.no_grad()
def layer_block_influence(model: nn.Module, calib_ids: torch.Tensor) -> torch.Tensor:
    """ShortGPT's Block Influence of each layer: 1 − mean over tokens of cos(layer input, output)."""
    layers = get_adapter(model).decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index: int) -> Callable:
        def observe(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            total[index] += cos.sum().double().cpu()
            count[index] += cos.numel()
        return observe

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for seq in tqdm(calib_ids, desc="block influence", leave=False):
            model(input_ids=seq[None].to(_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return 1.0 - total / count.clamp(min=1)


@torch.no_grad()
def calibration_nll(model: nn.Module, calib_ids: torch.Tensor) -> float:
    """Mean next-token NLL over the calibration sequences."""
    total, n = 0.0, 0
    for seq in calib_ids:
        seq = seq[None].to(_device(model))
        total += sequence_nll(model, seq, reduction="sum").item()
        n += seq.shape[1] - 1
    return total / n


@contextlib.contextmanager
def bypassed(layers: list[nn.Module]) -> Iterator[None]:
    """Temporarily make layers the identity (cheaper than copying the model to score a removal)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = types.MethodType(lambda _self, hidden_states, *a, **k: hidden_states, layer)
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def prune_shortgpt(model: nn.Module, calib_ids: torch.Tensor, ratio: float) -> PrunePlan:
    """ShortGPT (Men et al. 2024): remove the layers with the lowest Block Influence."""
    start = time.perf_counter()
    bi = layer_block_influence(model, calib_ids)
    drop = select_by_importance(bi, _layer_counts(model), ratio)
    return _finish(model, "shortgpt", ratio, _whole_layers(drop), {"layer_importance": bi.tolist(), "metric": "block influence"}, start)


def prune_joint_layer_drop(model: nn.Module, calib_ids: torch.Tensor, ratio: float) -> PrunePlan:
    """Joint Layer Drop (He et al. 2024): Block Influence of every attention and every MLP
    module, ``1 − cos(x, x + f(x))``; the two score lists are concatenated and the modules with
    the lowest scores are removed until the parameter ratio is met. Attention modules score
    lower, so they go first, as SkipGPT's appendix C describes; an MLP is removed as soon as its
    score is below that of the next attention module."""
    start = time.perf_counter()
    attach_routers(model)  # only for its per-module observers; detached before anything is removed
    try:
        bi = module_importance(model, calib_ids)
    finally:
        detach_routers(model)
    chosen = select_by_importance(bi, module_parameter_counts(model), ratio)
    removed = sorted((m // 2, KINDS[m % 2]) for m in chosen)
    return _finish(model, "joint-layer-drop", ratio, removed, {"module_importance": bi.tolist(), "metric": "block influence per module"}, start)


def prune_shortened_ppl(model: nn.Module, calib_ids: torch.Tensor, ratio: float) -> PrunePlan:
    """Shortened LLaMA, PPL criterion (Kim et al. 2024): a layer's importance is the calibration
    perplexity of the model without it; the layers whose removal hurts least go (one shot)."""
    start = time.perf_counter()
    layers = list(get_adapter(model).decoder_layers(model))
    ppl = torch.zeros(len(layers), dtype=torch.float64)
    for i, layer in enumerate(tqdm(layers, desc="PPL without each layer", leave=False)):
        with bypassed([layer]):
            ppl[i] = math.exp(min(calibration_nll(model, calib_ids), 700.0))
    drop = select_by_importance(ppl, _layer_counts(model), ratio)
    return _finish(model, "shortened-ppl", ratio, _whole_layers(drop), {"layer_importance": ppl.tolist(), "metric": "calibration PPL without the layer"}, start)


def prune_shortened_taylor(model: nn.Module, calib_ids: torch.Tensor, ratio: float) -> PrunePlan:
    """Shortened LLaMA, Taylor criterion (Kim et al. 2024): a layer's importance is the sum
    over its weights of |w · ∂L/∂w| (first-order estimate of the loss change when the weights
    are zeroed), with the calibration NLL as L. Plain Taylor, not Taylor+ (which also keeps
    the first layers by hand)."""
    start = time.perf_counter()
    layers = list(get_adapter(model).decoder_layers(model))
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)
    score = torch.zeros(len(layers), dtype=torch.float64)
    try:
        for seq in tqdm(calib_ids, desc="Taylor importance", leave=False):
            seq = seq[None].to(_device(model))
            sequence_nll(model, seq).div(len(calib_ids)).backward()
        for i, layer in enumerate(layers):  # the sum over samples, then |w·g| per weight, as Kim et al.
            score[i] = sum((p * p.grad).abs().sum().double().item() for p in layer.parameters() if p.grad is not None)
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    drop = select_by_importance(score, _layer_counts(model), ratio)
    return _finish(model, "shortened-taylor", ratio, _whole_layers(drop), {"layer_importance": score.tolist(), "metric": "sum |w * dL/dw|"}, start)


LACO_MERGE = 4  # C: layers merged into one per collapse (LaCo's setting for LLaMA2-7B)
LACO_INTERVAL = 2  # I: minimum distance between two collapse points
LACO_THRESHOLDS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.0)
LACO_SAMPLES = (4, 256)  # few-shot calibration: sequences × tokens, as LaCo's handful of sentences


@torch.no_grad()
def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    body = model.get_submodule(get_adapter(model).layers.rsplit(".", 1)[0])
    return body(input_ids=ids.to(_device(model)), use_cache=False).last_hidden_state.float()


def _merge_weights(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The projection weights LaCo merges (its code leaves norms to the layer merged into)."""
    return {n: p for n, p in layer.named_parameters() if "norm" not in n}


def prune_laco(model: nn.Module, calib_ids: torch.Tensor, ratio: float) -> PrunePlan:
    """LaCo (Yang et al. 2024): from the top down, collapse consecutive layers into the first
    of them with RDSC merging (θ_l + Σ_k (θ_{l+k} − θ_l), projection weights only, as LaCo's
    code); keep a collapse only if the final hidden states stay close (mean cosine > T) to the
    unpruned model's on a few calibration samples, then move down by I, otherwise by one.

    Two choices to hit a requested ratio on any model: at each position the largest collapse
    (C = 4 layers, LaCo's LLaMA setting) is tried first, then smaller ones down to 2 (on
    SmolLM2-135M a 4-layer RDSC merge leaves a final-state cosine of about 0.05, a 2-layer one
    about 0.97); and T is the highest value in a fixed ladder whose pass removes the requested
    number of layers: the loosest merging the ratio needs, and no looser.
    """
    start = time.perf_counter()
    layers = list(get_adapter(model).decoder_layers(model))
    n_layers = len(layers)
    counts = _layer_counts(model)
    want = len(select_by_importance(torch.arange(n_layers, dtype=torch.float64), counts, ratio))
    samples = calib_ids[: LACO_SAMPLES[0], : LACO_SAMPLES[1]]
    reference = _final_hidden(model, samples)
    originals = [{n: p.detach().clone() for n, p in _merge_weights(layer).items()} for layer in layers]

    def similarity(skipped: list[int]) -> float:
        with bypassed([layers[j] for j in skipped]):
            return float(F.cosine_similarity(_final_hidden(model, samples), reference, dim=-1).mean())

    def restore() -> None:
        for layer, saved in zip(layers, originals):
            for n, p in _merge_weights(layer).items():
                p.data.copy_(saved[n])

    def try_merge(group: list[int], gone: list[int], threshold: float, log: list[dict]) -> bool:
        base = _merge_weights(layers[group[0]])
        saved = {n: p.detach().clone() for n, p in base.items()}
        for n, p in base.items():
            p.data.add_(sum(_merge_weights(layers[j])[n].data - saved[n] for j in group[1:]))
        s = similarity(gone + group[1:])
        log.append({"layers": group, "similarity": s, "accepted": s > threshold})
        if s <= threshold:
            for n, p in base.items():
                p.data.copy_(saved[n])
        return s > threshold

    def run(threshold: float) -> tuple[list[int], list[int], list[dict]]:
        alive = list(range(n_layers))  # original indices of the layers still in the model
        merged: list[int] = []
        log: list[dict] = []
        position = n_layers - LACO_MERGE
        while position >= 1 and n_layers - len(alive) < want:
            largest = min(LACO_MERGE, want - (n_layers - len(alive)) + 1, len(alive) - position)
            gone = [j for j in range(n_layers) if j not in alive]
            group = next((alive[position : position + size] for size in range(largest, 1, -1)
                          if try_merge(alive[position : position + size], gone, threshold, log)), None)
            if group is None:
                position -= 1
                continue
            alive = [j for j in alive if j not in group[1:]]
            merged.append(group[0])
            position = min(position - LACO_INTERVAL, len(alive) - LACO_MERGE)
        return alive, merged, log

    for threshold in tqdm(LACO_THRESHOLDS, desc="LaCo thresholds", leave=False):
        alive, merged, log = run(threshold)
        if n_layers - len(alive) >= want or threshold == LACO_THRESHOLDS[-1]:
            break
        restore()
    gone = [j for j in range(n_layers) if j not in alive]

    def changed() -> list[str]:
        prefix = get_adapter(model).layers
        now = get_adapter(model).decoder_layers(model)
        return [f"{prefix}.{pos}.{n}" for pos, layer in enumerate(now) if layer.skipgpt_original_index in merged
                for n in _merge_weights(layer)]

    extra = {"threshold": threshold, "merge": LACO_MERGE, "interval": LACO_INTERVAL, "samples": list(samples.shape),
             "merged_into": sorted(merged), "trials": log}
    return _finish(model, "laco", ratio, _whole_layers(gone), extra, start, changed)


register(StaticMethod("shortgpt", "remove whole layers with the lowest Block Influence", prune_shortgpt, label="ShortGPT"))
register(StaticMethod("joint-layer-drop", "remove attention and MLP modules with the lowest Block Influence", prune_joint_layer_drop, granularity="module", label="Joint Layer Drop"))
register(StaticMethod("shortened-ppl", "remove the layers whose removal raises calibration PPL least", prune_shortened_ppl, label="Shortened-PPL"))
register(StaticMethod("shortened-taylor", "remove the layers with the lowest first-order Taylor importance", prune_shortened_taylor, label="Shortened-Taylor"))
register(StaticMethod("laco", "merge later layers into earlier ones while representations stay close", prune_laco, label="LaCo"))

"""LLM-Pruner, a width pruning baseline.

**LLM-Pruner** (Ma et al. 2023), block-wise: dependency groups (one KV head with its query
  heads: q/k/v rows and o columns; one MLP channel: gate/up rows and the down column) ranked
  by first-order Taylor importance ``sum |w * dL/dw|`` over the group's weights ("param_first",
  group reduction "sum") from calibration gradients, and the lowest groups removed at one
  per-layer rate in the layers LLM-Pruner prunes (layers 4..29 of 32, scaled to the depth).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SkipGPTError
from ..next_token import sequence_nll
from ..routing.adapters import get_adapter
from .registry import StaticMethod, register
from .structure import PrunePlan, decoder_parameter_count
from .width import ATTN_IN, ATTN_OUT, LLAMA_FAMILY, MLP_IN, MLP_OUT, check_model, device_of, finish, shrink_linear, total_params

LLM_PRUNER_TYPES = (*LLAMA_FAMILY, "gemma2", "gemma3_text")  # head/channel groups do not care about norms




def llm_pruner_layers(num_layers: int) -> tuple[int, int]:
    """The block range LLM-Pruner prunes, [4, 30) of LLaMA-7B's 32 layers, scaled to the depth
    (first 1/8 and last 1/16 of the layers untouched)."""
    start = round(4 * num_layers / 32)
    end = num_layers - round(2 * num_layers / 32)
    return (start, end) if start < end else (0, num_layers)


def _attn_geometry(attn: nn.Module) -> tuple[int, int, int]:
    """(head_dim, KV heads, query heads per KV head), read from the weight shapes."""
    head_dim = int(attn.head_dim)
    kv = attn.k_proj.out_features // head_dim
    return head_dim, kv, attn.q_proj.out_features // head_dim // kv


def _group_rows(kv_heads: list[int] | torch.Tensor, head_dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/o row (column) indices and k/v row indices of the given KV heads."""
    kv_heads = torch.as_tensor(kv_heads, dtype=torch.long)
    q_heads = (kv_heads[:, None] * group + torch.arange(group)).flatten()
    span = torch.arange(head_dim)
    return (q_heads[:, None] * head_dim + span).flatten(), (kv_heads[:, None] * head_dim + span).flatten()


def _unit_params(layer: nn.Module) -> tuple[int, int]:
    """Parameters of one attention group (KV head + its query heads) and of one MLP channel."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim, _, group = _attn_geometry(attn)
    per_q, per_kv = group * head_dim, head_dim
    head = per_q * attn.q_proj.in_features + 2 * per_kv * attn.k_proj.in_features + attn.o_proj.out_features * per_q
    head += sum(rows for lin, rows in ((attn.q_proj, per_q), (attn.k_proj, per_kv), (attn.v_proj, per_kv)) if lin.bias is not None)
    channel = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    channel += sum(1 for lin in (mlp.gate_proj, mlp.up_proj) if lin.bias is not None)
    return head, channel


def taylor_group_importance(
    model: nn.Module, calib_ids: torch.Tensor, layer_ids: list[int], batch_size: int = 1
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (importance of each KV-head group, importance of each MLP channel), the sum of
    |w * dL/dw| over the group's weights, dL/dw from the calibration LM loss (mean over all
    sequences, accumulated batch by batch)."""
    layers = get_adapter(model).decoder_layers(model)
    targets = {i: [getattr(layers[i].self_attn, n) for n in (*ATTN_IN, ATTN_OUT)]
               + [getattr(layers[i].mlp, n) for n in (*MLP_IN, MLP_OUT)] for i in layer_ids}
    weights = [lin.weight for lins in targets.values() for lin in lins]
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        n = calib_ids.shape[0]
        for batch in tqdm(calib_ids.split(batch_size), desc="LLM-Pruner gradients", leave=False):
            batch = batch.to(device_of(model))
            loss = sequence_nll(model, batch) * (batch.shape[0] / n)
            loss.backward()
        result = {}
        with torch.no_grad():
            for i, (q, k, v, o, gate, up, down) in targets.items():
                sal = {id(lin): (lin.weight.float() * lin.weight.grad.float()).abs() for lin in (q, k, v, o, gate, up, down)}
                head_dim, kv, group = _attn_geometry(layers[i].self_attn)
                rows = lambda lin: sal[id(lin)].sum(1)  # noqa: E731  (per output feature)
                cols = lambda lin: sal[id(lin)].sum(0)  # noqa: E731  (per input feature)
                per_q = (rows(q) + cols(o)).view(kv, group * head_dim).sum(1)
                per_kv = (rows(k) + rows(v)).view(kv, head_dim).sum(1)
                channels = rows(gate) + rows(up) + cols(down)
                result[i] = ((per_q + per_kv).cpu(), channels.cpu())
    finally:
        for w in weights:
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    return result


def _choose_rate(layers: nn.ModuleList, layer_ids: list[int], ratio: float, before: int) -> tuple[float, int, int, float]:
    """One rate r for every pruned layer: round(r * KV heads) head groups and round(r * channels)
    MLP channels go, r chosen so the decoder-layer ratio is closest to the request (at least one
    group and one channel stay). Returns (r, heads pruned, channels pruned, ratio step of one
    channel per layer)."""
    layer = layers[layer_ids[0]]
    _, kv, _ = _attn_geometry(layer.self_attn)
    channels = layer.mlp.gate_proj.out_features
    for i in layer_ids:  # uniform layers (true of every supported family)
        if _attn_geometry(layers[i].self_attn)[1] != kv or layers[i].mlp.gate_proj.out_features != channels:
            raise SkipGPTError("llm-pruner expects every pruned layer to have the same number of heads and channels")
    head_p, chan_p = _unit_params(layer)
    rates = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    n_heads = torch.round(rates * kv).clamp(max=kv - 1)
    n_chan = torch.round(rates * channels).clamp(max=channels - 1)
    achieved = len(layer_ids) * (n_heads * head_p + n_chan * chan_p) / before
    best = int(torch.argmin((achieved - ratio).abs() + rates * 1e-12))  # ties: the smaller rate
    return float(rates[best]), int(n_heads[best]), int(n_chan[best]), len(layer_ids) * chan_p / before


def _apply_llm_pruner(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    layers = get_adapter(model).decoder_layers(model)
    for key, keep in kept.items():
        layer = layers[int(key)]
        attn, mlp = layer.self_attn, layer.mlp
        head_dim, kv, group = _attn_geometry(attn)
        q_rows, kv_rows = _group_rows(keep["kv_heads"], head_dim, group)
        shrink_linear(attn.q_proj, rows=q_rows)
        shrink_linear(attn.k_proj, rows=kv_rows)
        shrink_linear(attn.v_proj, rows=kv_rows)
        shrink_linear(attn.o_proj, cols=q_rows)
        channels = torch.as_tensor(keep["channels"], dtype=torch.long)
        shrink_linear(mlp.gate_proj, rows=channels)
        shrink_linear(mlp.up_proj, rows=channels)
        shrink_linear(mlp.down_proj, cols=channels)
        # transformers reshapes with -1 heads and head_dim; keep the bookkeeping attributes true
        n_kv = len(keep["kv_heads"])
        for name, value in (("num_heads", n_kv * group), ("num_key_value_heads", n_kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep["channels"])


def prune_llm_pruner(
    model: nn.Module,
    calib_ids: torch.Tensor,
    ratio: float,
    *,
    layer_range: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> PrunePlan:
    """LLM-Pruner block-wise with Taylor param_first importance, per-layer rate set so that the
    decoder-layer parameter ratio is closest to ``ratio``."""
    start_time = time.perf_counter()
    check_model(model, "llm-pruner", LLM_PRUNER_TYPES)
    if not 0 <= ratio < 1:
        raise SkipGPTError(f"the pruning ratio must be in [0, 1), got {ratio}")
    layers = get_adapter(model).decoder_layers(model)
    start, end = layer_range or llm_pruner_layers(len(layers))
    if not 0 <= start < end <= len(layers):
        raise SkipGPTError(f"layer range [{start}, {end}) is outside the model's {len(layers)} layers")
    layer_ids = list(range(start, end))
    before, total_before = decoder_parameter_count(model), total_params(model)
    rate, n_heads, n_chan, step = _choose_rate(layers, layer_ids, ratio, before)
    importance = taylor_group_importance(model, calib_ids, layer_ids, batch_size) if ratio > 0 else {}
    head_dim, kv, group = _attn_geometry(layers[start].self_attn)
    kept: dict[str, dict[str, list[int]]] = {}
    for i in layer_ids:
        channels = layers[i].mlp.gate_proj.out_features
        if i in importance:
            head_imp, chan_imp = importance[i]
            heads = sorted(head_imp.argsort(descending=True)[: kv - n_heads].tolist())
            chans = sorted(chan_imp.argsort(descending=True)[: channels - n_chan].tolist())
        else:
            heads, chans = list(range(kv)), list(range(channels))
        kept[str(i)] = {"kv_heads": heads, "channels": chans}
    _apply_llm_pruner(model, kept)
    plan = PrunePlan(
        method="llm-pruner",
        target_ratio=ratio,
        extra={
            "layer_range": [start, end],
            "rate": rate,
            "kv_heads_pruned_per_layer": n_heads,
            "channels_pruned_per_layer": n_chan,
            "query_heads_per_kv_head": group,
            "head_dim": head_dim,
            "ratio_step": step,
            "importance": "Taylor param_first: sum over the group's weights of |w * dL/dw| (group reduction sum)",
            "calibration": list(calib_ids.shape),
            "kept": kept,
        },
    )
    return finish(model, plan, before, total_before, start_time)


def restructure_llm_pruner(model: nn.Module, plan: PrunePlan) -> None:
    """Pruned shapes on a fresh base model by indexing its own weights: nothing is saved."""
    check_model(model, "llm-pruner", LLM_PRUNER_TYPES)
    _apply_llm_pruner(model, plan.extra["kept"])


register(StaticMethod(
    name="llm-pruner",
    description="LLM-Pruner: remove KV-head groups and MLP channels with the lowest first-order Taylor "
                "importance in the middle layers (width)",
    prune=prune_llm_pruner,
    restructure=restructure_llm_pruner,
    granularity="width",
    label="LLM-Pruner",
))

"""How much each module changes the residual stream: Block Influence, per module.

``BI_m = 1 − mean over tokens of cos(x, x + f_m(x))`` (ShortGPT's metric, applied to each
attention and MLP module separately as Joint Layer Drop does). Used to seed routers so that
tuning starts from the best static module cut instead of from the dense model.
"""

from __future__ import annotations

import torch

from ..routing.surgery import observe_dense, routing_state


@torch.no_grad()
def module_importance(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Block Influence of every routable module [2L] on ``sequences`` with every module executing."""
    state = routing_state(model)
    total = torch.zeros(state.num_modules, dtype=torch.float64)
    count = torch.zeros(state.num_modules, dtype=torch.float64)

    def observe(index: int, x: torch.Tensor, update: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x.float(), (x + update).float(), dim=-1)
        if state.token_mask is not None:
            cos = cos[state.token_mask]
        total[index] += cos.sum().double().cpu()
        count[index] += cos.numel()

    observe_dense(model, sequences, observe, batch_size)
    return 1.0 - total / count.clamp(min=1)


def static_skip_set(importance: torch.Tensor, weights: torch.Tensor, target: float, total: float | None = None) -> torch.Tensor:
    """Boolean [2L]: the least important modules whose weight adds up to ``target`` of ``total``
    (default: the sum of the weights; the last one taken only if that lands closer to the target
    than stopping before it)."""
    skip = torch.zeros_like(importance, dtype=torch.bool)
    share = weights.double() / (weights.double().sum() if total is None else total)
    done = 0.0
    for m in importance.argsort().tolist():
        if abs(done + share[m] - target) > abs(done - target):
            break
        skip[m] = True
        done += float(share[m])
    return skip


@torch.no_grad()
def seed_routers_from_importance(model: torch.nn.Module, sequences: torch.Tensor, target: float, unit: str) -> dict[str, object]:
    """Set each router's execute bias to ±init_bias so that argmax routing starts as the static
    module cut (lowest Block Influence first) at the target ratio."""
    state = routing_state(model)
    importance = module_importance(model, sequences)
    if unit == "params":
        skip = static_skip_set(importance, state.saved_params, target, float(state.module_params.sum()))
    else:
        skip = static_skip_set(importance, torch.ones(state.num_modules, dtype=torch.float64), target)
    strength = state.config.init_bias
    for index, layer in enumerate(state.adapter.decoder_layers(model)):
        for offset, kind in enumerate(("attn", "mlp")):
            last = layer.skip_routers[kind].net
            last = last[-1] if isinstance(last, torch.nn.Sequential) else last
            last.bias.copy_(torch.tensor([0.0, -strength if skip[2 * index + offset] else strength]))
    return {"importance": importance.tolist(), "seed_skip": skip.nonzero().flatten().tolist()}

"""Sparsity as the paper defines it, from hard gates over real (non-padding) tokens.

Module index m = 2·layer + (0 for attention, 1 for MLP). ``module`` sparsity counts every
(token, module) pair equally (paper Eq. 7); ``params`` weighs each pair by its module's
parameter count (the paper's "Ratio" column), net of the replacement a skip still runs and of the
routers every token runs whatever it decides (a linear router is 2·d + 2 parameters a module, the
``mlp`` router about d²/4: 0.07 % and 4.7 % of SmolLM2's decoder). Both are differentiable in the
gates, so the same function serves the training loss and the reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparsityStats:
    module: torch.Tensor
    params: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    tokens: int

    def value(self, unit: str) -> torch.Tensor:
        return self.params if unit == "params" else self.module

    def as_dict(self) -> dict[str, float]:
        return {
            "module_sparsity": float(self.module),
            "param_ratio": float(self.params),
            "attn_sparsity": float(self.attn),
            "mlp_sparsity": float(self.mlp),
            "tokens": self.tokens,
        }


def _skipped_per_module(gates: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(skipped count per module [M], number of real tokens) for execute gates [M, B, T]."""
    skipped = 1.0 - gates
    if token_mask is None:
        return skipped.sum(dim=(1, 2)), gates.shape[1] * gates.shape[2]
    mask = token_mask.to(gates.device, gates.dtype)
    return (skipped * mask).sum(dim=(1, 2)), int(token_mask.sum())


def _ratios(skipped: torch.Tensor, tokens: int, module_params: torch.Tensor,
            replacement_params: torch.Tensor | None, router_params: torch.Tensor | None = None) -> SparsityStats:
    n = max(tokens, 1)
    total = module_params.to(skipped.dtype)
    # A skip saves its module's parameters less its replacement's, out of the dense total; the
    # routers cost every token their parameters, skipping or not.
    saved = total if replacement_params is None else total - replacement_params.to(skipped.device, skipped.dtype)
    routers = 0.0 if router_params is None else router_params.to(skipped.device, skipped.dtype).sum() / total.sum()
    return SparsityStats(
        module=skipped.sum() / (n * skipped.numel()),
        params=(skipped * saved).sum() / (n * total.sum()) - routers,
        attn=skipped[0::2].sum() / (n * skipped[0::2].numel()),
        mlp=skipped[1::2].sum() / (n * skipped[1::2].numel()),
        tokens=tokens,
    )


def gate_stats(gates: torch.Tensor, token_mask: torch.Tensor | None, module_params: torch.Tensor,
               replacement_params: torch.Tensor | None = None, router_params: torch.Tensor | None = None) -> SparsityStats:
    """Statistics of one forward pass; gradients flow through ``gates``."""
    skipped, tokens = _skipped_per_module(gates, token_mask)
    return _ratios(skipped, tokens, module_params.to(gates.device), replacement_params, router_params)


class SparsityMeter:
    """Accumulates gate decisions over many forwards (an evaluation, a generation)."""

    def __init__(self, module_params: torch.Tensor, replacement_params: torch.Tensor | None = None,
                 router_params: torch.Tensor | None = None):
        self.module_params = module_params.detach().double().cpu()
        self.replacement_params = None if replacement_params is None else replacement_params.detach().double().cpu()
        self.router_params = None if router_params is None else router_params.detach().double().cpu()
        self.skipped = torch.zeros_like(self.module_params)
        self.tokens = 0

    def update(self, gates: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        skipped, tokens = _skipped_per_module(gates.detach().double(), token_mask)
        self.skipped += skipped.cpu()
        self.tokens += tokens

    def summary(self) -> dict[str, object]:
        stats = _ratios(self.skipped, self.tokens, self.module_params, self.replacement_params, self.router_params).as_dict()
        skip_rate = (self.skipped / max(self.tokens, 1)).tolist()
        stats["per_layer"] = [
            {"layer": i, "attn_skip": skip_rate[2 * i], "mlp_skip": skip_rate[2 * i + 1]}
            for i in range(len(skip_rate) // 2)
        ]
        return stats

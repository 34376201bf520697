"""Fitting replacements to the dense modules before router tuning starts.

A replacement (:class:`~skipgpt.routing.routers.Replacement`) is trained with the routers, but from
zero it would need far more steps than a CPU budget has: SmolLM2's module outputs grow by orders
of magnitude with depth, and Adam moves each weight by about the learning rate per step. A
closed-form start costs one dense pass: the mean output (``bias``) or the reduced-rank linear
regression of the module's output on its RMS-normalised input (``lowrank``), the best rank-r
linear predictor of f(x) from x̂ on that text.
"""

from __future__ import annotations

import torch

from ..routing.routers import rms_normalised
from ..routing.surgery import observe_dense, routing_state

RIDGE = 1e-4  # relative to the mean input variance: keeps the normal equations well conditioned


class _Moments:
    """Running sums for one module, in float64: n, Σx̂, Σy and, for low rank, x̂ᵀx̂ and x̂ᵀy."""

    def __init__(self, hidden: int, second: bool):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.sx, self.sy = zeros(hidden), zeros(hidden)
        self.xx, self.xy = (zeros(hidden, hidden), zeros(hidden, hidden)) if second else (None, None)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        if self.xx is not None:
            self.xx += x.t() @ x
            self.xy += x.t() @ y


def _reduced_rank(m: _Moments, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bias, down [r, d], up [d, r]) of the best rank-r affine predictor of y from x̂.

    Ridge regression W, then the projection of its fitted values onto their top-r principal
    directions V (reduced-rank regression): x̂ ↦ x̂·W·V·Vᵀ. The two factors share the scale of
    each direction, so Adam meets them well conditioned.
    """
    mx, my = m.sx / m.n, m.sy / m.n
    cxx = m.xx / m.n - torch.outer(mx, mx)
    cxy = m.xy / m.n - torch.outer(mx, my)
    ridge = RIDGE * float(cxx.diagonal().mean().clamp(min=1e-12))
    w = torch.linalg.solve(cxx + ridge * torch.eye(len(mx), dtype=cxx.dtype), cxy)
    _, vectors = torch.linalg.eigh(w.t() @ cxx @ w)  # covariance of the fitted values, ascending
    v = vectors[:, -rank:].flip(-1)
    a = w @ v  # [d, r]
    scale = a.norm(dim=0).clamp(min=1e-12).sqrt()
    down, up = (a / scale).t(), v * scale
    bias = my - (mx @ a) @ v.t()
    return bias, down, up


@torch.no_grad()
def fit_replacements(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Fit every replacement to its dense module on ``sequences`` (every module executing).

    Returns the mean share of each module's output power that the fit explains (R², averaged
    over modules), a check that the start is better than nothing.
    """
    state = routing_state(model)
    routers = [m for m in model.modules() if hasattr(m, "skipgpt_index")]
    routers = [r for layer in sorted(routers, key=lambda m: m.skipgpt_index) for r in (layer.skip_routers["attn"], layer.skip_routers["mlp"])]
    if routers[0].replacement is None:
        return {}
    rank = routers[0].replacement.rank
    hidden = routers[0].replacement.bias.numel()
    moments = [_Moments(hidden, rank > 0) for _ in routers]
    power = torch.zeros(len(routers), dtype=torch.float64)

    def observe(index: int, x: torch.Tensor, update: torch.Tensor) -> None:
        real = state.token_mask
        xs = rms_normalised(x) if real is None else rms_normalised(x)[real]
        ys = update.float() if real is None else update.float()[real]
        moments[index].add(xs.reshape(-1, hidden), ys.reshape(-1, hidden))
        power[index] += ys.double().pow(2).sum()

    observe_dense(model, sequences, observe, batch_size)
    for router, m in zip(routers, moments):
        r = router.replacement
        if rank:
            bias, down, up = _reduced_rank(m, rank)
            r.down.copy_(down.to(r.down))
            r.up.copy_(up.to(r.up))
        else:
            bias = m.sy / m.n
        r.bias.copy_(bias.to(r.bias))
    # R² on the same text: 1 − residual power / output power, one more pass with the fitted maps.
    residual = torch.zeros(len(routers), dtype=torch.float64)

    def score(index: int, x: torch.Tensor, update: torch.Tensor) -> None:
        real = state.token_mask
        error = (update.float() - routers[index].replacement(x).float())
        residual[index] += (error if real is None else error[real]).double().pow(2).sum()

    observe_dense(model, sequences, score, batch_size)
    explained = 1.0 - residual / power.clamp(min=1e-12)
    return {
        "fit_tokens": moments[0].n,
        "explained_attn": float(explained[0::2].mean()),
        "explained_mlp": float(explained[1::2].mean()),
        "explained_per_module": [round(float(e), 4) for e in explained],
    }

"""Fitting replacements to the dense modules before router tuning starts.

A replacement (:class:`~skipgpt.routing.routers.Replacement`) is trained with the routers, but from
zero it would need far more steps than a CPU budget has: SmolLM2's module outputs grow by orders
of magnitude with depth, and Adam moves each weight by about the learning rate per step. A
closed-form start costs one dense pass: the mean output (``bias``) or the reduced-rank linear
regression of the module's output on its RMS-normalised input (``lowrank``), the best rank-r
linear predictor of f(x) from x̂ on that text.

The pass streams the model one decoder layer at a time, so that the d×d statistics of only one
layer's two modules exist at once: every module's at once would be 17 GB at 8B and 170 GB at 70B.
Each module's statistics live on that module's device. Memory and time as functions of d, L and
the token count: docs/method-choices.md, "Replacement fit: memory and time".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..devices import input_device
from ..routing.adapters import KINDS
from ..routing.routers import Replacement, rms_normalised
from ..routing.surgery import _routed_layers, gate_mode, routing_state

RIDGE = 1e-4  # relative to the mean input variance: keeps the normal equations well conditioned
# Sums are taken around the first batch's means, which removes the cancellation in E[x̂x̂ᵀ] − mmᵀ;
# float32 then fits as float64 does (R² measured on SmolLM2 in docs/method-choices.md) at half the
# memory, and at full speed on GPUs whose float64 is slow.
ACCUMULATE = torch.float32
# The per-module solve and score: a few d×d matrices once per module, so float64 costs little,
# and the ridge bounds the condition number of Cxx + λI only by 1 + 10⁴·d (8·10⁷ at d = 8192),
# past float32's 1/ε, where a float32 Cholesky factorisation can fail.
SOLVE = torch.float64
# The top-r directions by subspace iteration on r + OVERSAMPLE vectors: O(d²·r) a step where a
# full eigendecomposition is O(d³).
OVERSAMPLE = 16
SUBSPACE_STEPS = 12
# A d-dimensional regression needs several tokens per dimension, or its ridge term decides it.
MIN_FIT_TOKENS = 8192
TOKENS_PER_DIMENSION = 4
# Tokens per forward of the fit: the streamed layer's activations over one batch are the fit's
# largest transient (its MLP's 3·tokens·intermediate values), so a batch is counted in tokens,
# not sequences: 4 × 256 as before, one sequence of 1,024 or more.
FIT_BATCH_TOKENS = 1024


def fit_sequence_count(model: nn.Module, requested: int | None, seq_len: int) -> int:
    """``TuneConfig.fit_sequences``, None resolved to enough sequences of ``seq_len`` for
    max(8192, 4·d) tokens (32 of 256 for a small model): a fixed count starves the regression as
    d grows, and a count of long sequences holds more tokens than the regression needs."""
    if requested is not None:
        return requested
    tokens = max(MIN_FIT_TOKENS, TOKENS_PER_DIMENSION * routing_state(model).config.hidden_size)
    return math.ceil(tokens / seq_len)


def fit_batch_size(seq_len: int) -> int:
    """Sequences per forward of the fit: :data:`FIT_BATCH_TOKENS` of them, at least one."""
    return max(1, FIT_BATCH_TOKENS // seq_len)


class Moments:
    """One module's sums of (x̂, y) pairs, in ``ACCUMULATE`` on the module's device, around the
    first batch's means ``x0``, ``y0``. Padding enters with weight 0 rather than by indexing, which
    would make the host wait for the device to count the real tokens."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, second: bool):
        self.x0, self.y0 = _mean(x, weight), _mean(y, weight)
        zeros = lambda *shape: torch.zeros(*shape, dtype=ACCUMULATE, device=x.device)  # noqa: E731
        hidden = x.shape[-1]
        self.n, self.yy = zeros(()), zeros(())
        self.sx, self.sy = zeros(hidden), zeros(hidden)
        self.xx, self.xy = (zeros(hidden, hidden), zeros(hidden, hidden)) if second else (None, None)

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Add tokens ``x`` [n, d], ``y`` [n, d] (``ACCUMULATE``) with ``weight`` [n] in {0, 1}."""
        x, y = x - self.x0, y - self.y0
        wx, wy = (x, y) if weight is None else (x * weight[:, None], y * weight[:, None])
        self.n += x.shape[0] if weight is None else weight.sum()
        self.sx += wx.sum(0)
        self.sy += wy.sum(0)
        self.yy += (wy * y).sum()
        if self.xx is not None:
            self.xx.addmm_(wx.t(), x)
            self.xy.addmm_(wx.t(), y)


def _mean(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return v.mean(0)
    return (v * weight[:, None]).sum(0) / weight.sum().clamp(min=1)


@dataclass
class Statistics:
    """What one module's fit and its score need, in ``SOLVE``."""

    n: torch.Tensor
    mx: torch.Tensor
    my: torch.Tensor
    cyy: torch.Tensor  # trace of the output covariance, E‖y − my‖²
    power: torch.Tensor  # E‖y‖², the denominator of R²
    cxy: torch.Tensor | None = None
    ridge: torch.Tensor | None = None
    regression: torch.Tensor | None = None  # W = (Cxx + λI)⁻¹·Cxy, the full-rank ridge regression

    @classmethod
    def of(cls, m: Moments) -> Statistics:
        """Takes ``m``'s d×d sums, releasing each once converted: with the other module's sums,
        32·d² bytes at the peak (Cxx, its factor, Cxy and W never exist at once)."""
        n = m.n.to(SOLVE).clamp(min=1)
        dx, dy = m.sx.to(SOLVE) / n, m.sy.to(SOLVE) / n  # the means, relative to the shift
        x0, y0, yy = m.x0.to(SOLVE), m.y0.to(SOLVE), m.yy.to(SOLVE) / n
        s = cls(n, x0 + dx, y0 + dy, cyy=yy - dy @ dy, power=yy + 2 * (y0 @ dy) + y0 @ y0)
        if m.xx is not None:
            cxx, m.xx = _covariance(m.xx, n, dx, dx), None
            s.ridge = RIDGE * cxx.diagonal().mean().clamp(min=1e-12)
            cxx.diagonal().add_(s.ridge)
            factor = torch.linalg.cholesky(cxx)
            del cxx
            s.cxy, m.xy = _covariance(m.xy, n, dx, dy), None
            s.regression = torch.cholesky_solve(s.cxy, factor)
        return s


def _covariance(shifted: torch.Tensor, n: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Cov(a, b) in ``SOLVE`` from Σ(a − a0)(b − b0)ᵀ and the shifted means da, db."""
    return shifted.to(SOLVE).div_(n).addr_(da, db, alpha=-1)


@dataclass
class Fit:
    """x̂ ↦ bias + x̂·a·vᵀ, and the share of the output power it explains on the fit text."""

    bias: torch.Tensor
    a: torch.Tensor | None  # [d, r]
    v: torch.Tensor | None  # [d, r], orthonormal columns
    explained: torch.Tensor


def mean_fit(s: Statistics) -> Fit:
    return Fit(s.my, None, None, 1 - s.cyy / s.power.clamp(min=1e-12))


def reduced_rank_fit(s: Statistics, rank: int) -> Fit:
    """The best rank-r affine predictor of y from x̂: the ridge regression W projected onto the
    top-r principal directions V of its fitted values (reduced-rank regression), x̂ ↦ x̂·W·V·Vᵀ.
    V needs only products with the fitted values' covariance M = Wᵀ·Cxx·W, and Cxx·W = Cxy − λW
    (the normal equations), so neither M nor Cxx is formed.

    R² comes from the moments: with a = W·V and vᵀv = I the residual E‖(y − my) − (x̂ − mx)·a·vᵀ‖²
    is tr Cyy − 2⟨a, Cxy·V⟩ + ⟨a, Cxx·a⟩ = tr Cyy − ⟨a, Cxy·V⟩ − λ‖a‖², so scoring needs no second pass.
    """
    w, cxy, ridge = s.regression, s.cxy, s.ridge

    def fitted_covariance(rows: torch.Tensor) -> torch.Tensor:  # rows·M = rows·(Cxy − λW)ᵀ·W
        return (rows @ cxy.t() - ridge * (rows @ w.t())) @ w

    start = torch.randn(min(len(w), rank + OVERSAMPLE), len(w), dtype=w.dtype, device=w.device,
                        generator=torch.Generator(w.device).manual_seed(0))  # own generator: tuning's RNG stream stays as it was
    v = top_directions(fitted_covariance, start, rank).t()
    a = w @ v
    residual = s.cyy - (a * (cxy @ v)).sum() - ridge * a.pow(2).sum()
    bias = s.my - (s.mx @ a) @ v.t()
    return Fit(bias, a, v, 1 - residual / s.power.clamp(min=1e-12))


def top_directions(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` eigenvectors, as rows [rank, d] in descending order, of the symmetric PSD
    map ``apply`` (of row vectors), by subspace iteration from ``start`` [k, d] and a Rayleigh-Ritz
    step: exact once k = d. Rows, because on a CPU [k, d]·[d, d] runs at twice the speed of
    [d, d]ᵀ·[d, k]."""
    rows = _orthonormal_rows(start)
    for _ in range(SUBSPACE_STEPS):
        rows = _orthonormal_rows(apply(rows))
    _, vectors = torch.linalg.eigh(apply(rows) @ rows.t())  # ascending
    return vectors[:, -rank:].flip(-1).t() @ rows


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(rows.t()).Q.t()


def _assign(replacement: Replacement, fit: Fit) -> None:
    """Write a fit into a replacement. ``down`` and ``up`` share the scale of each direction, so
    Adam meets them well conditioned."""
    if fit.a is not None:
        scale = fit.a.norm(dim=0).clamp(min=1e-12).sqrt()
        replacement.down.copy_((fit.a / scale).t())
        replacement.up.copy_(fit.v * scale)
    replacement.bias.copy_(fit.bias)


class _Recorded(Exception):
    """Ends the recording forward after the last routed layer: the final norm and the LM head (a
    vocabulary-wide logit tensor) are not needed."""


@dataclass
class _Batch:
    hidden: torch.Tensor  # the next layer's input, model dtype, on the device of the layer that made it
    kwargs: list[dict[str, Any]]  # each routed layer's keyword arguments (Gemma's masks and rotary tables differ by layer)
    token_mask: torch.Tensor | None  # the real tokens of this batch's forward (RoutingState.token_mask)


def _record_inputs(model: nn.Module, layers: list[nn.Module], sequences: torch.Tensor, batch_size: int) -> list[_Batch]:
    """Per batch, the first routed layer's input and what every routed layer is called with, from
    forwards whose layers pass their input through: the embedding and the masks, nothing more."""
    state = routing_state(model)
    device = input_device(model)
    batches: list[_Batch] = []

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def forward(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if index == 0:
                batches.append(_Batch(hidden_states, [], state.token_mask))
            batches[-1].kwargs.append(kwargs)
            if index == len(layers) - 1:
                raise _Recorded
            return hidden_states

        return forward

    routed = [layer.forward for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        for batch in sequences.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Recorded:
                pass
    finally:
        for layer, forward in zip(layers, routed):
            layer.forward = forward
    return batches


def _fit_layer(layer: nn.Module, batches: list[_Batch], rank: int) -> list[Fit]:
    """Run every batch through ``layer`` (called as a module, so that device hooks still move its
    inputs), accumulating its two modules' moments, and fit them; each batch's hidden state
    becomes the layer's output."""
    state = layer.skipgpt_state
    moments: dict[int, Moments] = {}

    def observe(index: int, x: torch.Tensor, update: torch.Tensor) -> None:
        real = state.token_mask
        weight = None if real is None else real.reshape(-1).to(x.device, ACCUMULATE)
        xs = rms_normalised(x).reshape(-1, x.shape[-1]).to(ACCUMULATE)
        ys = update.reshape(-1, x.shape[-1]).to(ACCUMULATE)
        if index not in moments:
            moments[index] = Moments(xs, ys, weight, rank > 0)
        moments[index].add(xs, ys, weight)

    state.observers.append(observe)
    try:
        for batch in batches:
            state.set_token_mask(batch.token_mask)
            batch.hidden = layer(batch.hidden, **batch.kwargs[layer.skipgpt_index])
    finally:
        state.observers.remove(observe)
    fit = (lambda s: reduced_rank_fit(s, rank)) if rank else mean_fit
    return [fit(Statistics.of(moments.pop(index))) for index in sorted(moments)]  # popped: freed once converted


@torch.no_grad()
def fit_replacements(model: nn.Module, sequences: torch.Tensor, batch_size: int | None = None) -> dict[str, Any]:
    """Fit every replacement to its dense module on ``sequences`` (every module executing), in
    forwards of ``batch_size`` sequences (default: :func:`fit_batch_size`).

    Returns the share of each module's output power that the fit explains on that text (R²,
    also averaged over attention and MLP modules), a check that the start is better than nothing.
    """
    state = routing_state(model)
    layers = _routed_layers(model)
    first = layers[0].skip_routers[KINDS[0]].replacement
    if first is None:
        return {}
    token_mask = state.token_mask
    scores: list[torch.Tensor] = []
    try:
        with gate_mode(model, "dense"):
            batches = _record_inputs(model, layers, sequences, batch_size or fit_batch_size(sequences.shape[1]))
            for layer in layers:
                for kind, fit in zip(KINDS, _fit_layer(layer, batches, first.rank), strict=True):
                    _assign(layer.skip_routers[kind].replacement, fit)
                    scores.append(fit.explained)
    finally:
        state.set_token_mask(token_mask)
    explained = [float(e) for e in scores]  # read once the device is done
    tokens = sum(b.hidden.shape[:-1].numel() if b.token_mask is None else b.token_mask.sum() for b in batches)
    return {
        "fit_tokens": int(tokens),
        "explained_attn": sum(explained[0::2]) / len(explained[0::2]),
        "explained_mlp": sum(explained[1::2]) / len(explained[1::2]),
        "explained_per_module": [round(e, 4) for e in explained],
    }

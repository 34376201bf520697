"""The per-module router and the three ways its logits become an execute gate.

Logit 0 is *skip*, logit 1 is *execute* (as in the paper). Routers always compute in
float32: they are tiny, and a bf16 logit margin is too coarse for a decision threshold.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig

GateMode = Literal["gumbel", "argmax", "dense", "fixed"]
GATE_MODES: tuple[str, ...] = ("gumbel", "argmax", "dense", "fixed")


RMS_EPS = 1e-6


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _RMSNormalised(torch.autograd.Function):
    """``x̂ = x / rms(x)`` in float32, saving for backward only ``x`` itself (the residual stream,
    which the graph holds anyway) and the per-token scale. Autograd's own version saves a float32
    copy of ``x`` and its square as well: two d-wide float32 tensors per token per router input,
    a third of what routing adds to a tuning step's activations at 8B (benchmarks/scale.py)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_float32(x)
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        ctx.save_for_backward(x, scale)
        return xf * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        x, scale = ctx.saved_tensors
        y = _at_least_float32(x) * scale
        # d(x·s)/dx with s = (mean(x²) + ε)^(-1/2): s·(g − y·mean(g·y))
        return (scale * (grad - y * (grad * y).mean(-1, keepdim=True))).to(x.dtype)


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS norm, in float32: the residual stream's scale grows by orders of
    magnitude with depth, which would otherwise need one learning rate per layer."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RMSNormalised.apply(x)
    xf = _at_least_float32(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)


class Replacement(nn.Module):
    """What a skipped module leaves in the residual stream instead of nothing: ``b + U·D·x̂``.

    ``b`` alone (rank 0) is the module's mean output, one add per token. A rank-r map of the
    RMS-normalised hidden state ``x̂`` adds what the token's own state predicts of the output
    (2·d·r parameters, r ≪ d; the branch's own norm weight folds into ``D``). Both are fitted to
    the dense module on data before tuning (:func:`skipgpt.training.replacements.fit_replacements`) and then
    trained with the routers. Raw parameters, not ``nn.Linear``: LoRA's target names
    (``up_proj``, ...) must never match them.
    """

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        if rank:
            # LoRA's start: the output is zero (a skip leaves nothing, as in the paper) and yet the
            # gradient reaches ``up``; fitting replaces both before tuning.
            self.down = nn.Parameter(torch.randn(rank, hidden_size) / hidden_size**0.5)
            self.up = nn.Parameter(torch.zeros(hidden_size, rank))

    def forward(self, hidden: torch.Tensor, normalised: torch.Tensor | None = None) -> torch.Tensor:
        """``normalised``: ``rms_normalised(hidden)`` where the caller has it already (the router's
        input in training), so that autograd keeps one copy of it for both."""
        out = self.bias.expand(*hidden.shape[:-1], -1)
        if self.rank:
            x = rms_normalised(hidden) if normalised is None else normalised
            out = out + (x @ self.down.t()) @ self.up.t()
        return out.to(hidden.dtype)

    def cost(self) -> int:
        """Parameters, which is also multiply-accumulates per token."""
        return sum(p.numel() for p in self.parameters())


class Router(nn.Module):
    """``W x -> (skip, execute)`` logits; ``mlp`` is the reference code's d -> d/4 -> 2 variant.

    With ``config.replacement`` it also holds the :class:`Replacement` a skipping token gets, so
    a router set (weights and config) is everything routing adds to the base model.
    """

    def __init__(self, hidden_size: int, config: RouterConfig):
        super().__init__()
        self.input_norm = config.input_norm
        if config.router == "linear":
            self.net: nn.Module = nn.Linear(hidden_size, 2)
            last = self.net
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_size // 4), nn.ReLU(), nn.Linear(hidden_size // 4, 2)
            )
            last = self.net[-1]
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, config.init_bias]))
        self.replacement = None if config.replacement == "none" else Replacement(hidden_size, config.replacement_rank)
        self._difference: tuple[tuple[float, ...], torch.Tensor, float] | None = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``model.to(torch.bfloat16)`` moves routers with the model but leaves them float32."""
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def cost(self) -> int:
        """The router's own parameters (its replacement apart), which every token runs."""
        return sum(p.numel() for p in self.net.parameters())

    def forward(self, hidden: torch.Tensor, normalised: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [.., 2]; ``normalised`` as for :meth:`Replacement.forward` (used with ``input_norm``)."""
        if self.input_norm:
            x = rms_normalised(hidden) if normalised is None else normalised
        else:
            x = hidden.float()
        if not torch.is_autocast_enabled(hidden.device.type):  # the common case; entering a context costs µs per module
            return self.net(x)
        # Margins in float32 even under bf16 autocast: a training step must take the decisions
        # that fp32 inference (:meth:`execute`) takes, and near-ties flip at bf16's 8 bits.
        with torch.autocast(hidden.device.type, enabled=False):
            return self.net(x)

    def execute(self, hidden: torch.Tensor, threshold: float) -> torch.Tensor:
        """Argmax decision ``margin > threshold`` as a bool [..], at a fraction of the cost.

        At decode time a router runs once per module per token, so its handful of tiny kernels
        are what "nothing skipped" costs over the dense model. For a linear router the margin
        is ``x̂·(w₁ − w₀) + (b₁ − b₀)``, so the decision is ``x·Δw > (threshold − Δb)·rms(x)``:
        one dot product, one norm, one comparison.
        """
        params = self.net._parameters  # a dict lookup, not Module.__getattr__: this runs per module and token
        weight, bias = params.get("weight"), params.get("bias")
        # An MLP router, or one offloaded by accelerate (a device map sending its layer to the CPU
        # or disk): only a forward call onloads the weights, through the hook on ``net``.
        if weight is None or weight.device.type == "meta":
            return margin(self(hidden)) > threshold
        key = (weight._version, bias._version, weight.data_ptr(), bias.data_ptr(), threshold)
        if self._difference is None or self._difference[0] != key:  # weights or threshold changed since last use
            offset = threshold - float(bias[1] - bias[0])
            # x̂·Δw > offset  ⇔  x·Δw > offset·‖x‖/√d (rms(x) = ‖x‖/√d; the norm's ε, 1e-6 against
            # mean squares of order 1, is left out here)
            scale = offset / hidden.shape[-1] ** 0.5 if self.input_norm else offset
            self._difference = (key, (weight[1] - weight[0]).detach()[:, None], scale)
        _, dw, scale = self._difference
        x = hidden if hidden.dtype == torch.float32 else hidden.float()
        score = (x @ dw).squeeze(-1)
        if not self.input_norm or scale == 0:
            return score > scale
        return score > torch.linalg.vector_norm(x, dim=-1) * scale


def margin(logits: torch.Tensor) -> torch.Tensor:
    """How strongly a router prefers executing; argmax executes where margin > threshold."""
    return logits[..., 1] - logits[..., 0]


def execute_gate(logits: torch.Tensor, mode: GateMode, tau: float, threshold: float, noise: float = 1.0) -> torch.Tensor:
    """Execute gate in {0, 1} with shape ``logits.shape[:-1]``.

    ``gumbel``: hard one-hot forward, soft Gumbel-softmax gradient backward (straight-through).
    ``noise`` scales the Gumbel noise: 1 is the paper's sampler (the same draws as
    ``F.gumbel_softmax``), 0 makes the forward decision the argmax one that inference deploys,
    with the straight-through gradient of the tempered softmax unchanged.
    ``argmax``: deterministic inference decision, no gradient.
    """
    if mode == "gumbel":
        if noise == 1.0:
            return F.gumbel_softmax(logits, tau=tau, hard=True)[..., 1]
        gumbels = -torch.empty_like(logits).exponential_().log() * noise if noise else torch.zeros_like(logits)
        soft = ((logits + gumbels) / tau).softmax(-1)[..., 1]
        hard = (soft > 0.5).to(soft.dtype)
        return hard - soft.detach() + soft
    if mode == "argmax":
        return (margin(logits) > threshold).to(logits.dtype)
    raise ValueError(f"execute_gate does not handle mode {mode!r}")


def argmax_straight_through(logits: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    """The decision argmax routing would take (``margin > threshold``) in the forward pass, with
    the gradient of ``sigmoid((margin - threshold) / tau)``: what the noise-free sampler's
    straight-through gradient would be, so a sparsity term can steer the deployed ratio itself."""
    score = (margin(logits) - threshold) / tau
    soft = torch.sigmoid(score)
    return (score > 0).to(soft.dtype) - soft.detach() + soft


def topk_gate(logits: torch.Tensor, token_mask: torch.Tensor | None, capacity: float, train: bool) -> torch.Tensor:
    """MoD routing: the ceil(capacity · n) highest-scoring real tokens of each sequence execute.

    Training multiplies nothing into the residual stream (the frozen model sees exactly its own
    modules): the hard top-k mask goes forward and sigmoid(score) carries the gradient, the
    straight-through form of MoD's router weight. The choice looks at the whole sequence, as
    MoD's training does; decoding one token at a time therefore executes everything.
    """
    score = margin(logits)
    real = torch.ones_like(score, dtype=torch.bool) if token_mask is None else token_mask
    k = torch.ceil(capacity * real.sum(-1) - 1e-6).long()
    rank = score.masked_fill(~real, float("-inf")).argsort(-1, descending=True).argsort(-1)
    hard = (rank < k[:, None]) & real
    if not train:
        return hard
    soft = torch.sigmoid(score)
    return hard.to(soft.dtype) + soft - soft.detach()


def budget_gate(proposed: torch.Tensor, executed: torch.Tensor, layer: int, num_layers: int, budget: int) -> torch.Tensor:
    """D-LLM's per-token budget, decided causally layer by layer: a token that has already
    executed ``budget`` layers skips the rest, and one that needs every remaining layer to reach
    its budget executes them. In between the router decides (its gradient kept)."""
    need = budget - executed
    force_on = need >= num_layers - layer
    force_off = need <= 0
    if proposed.dtype == torch.bool:
        return (proposed | force_on) & ~force_off
    return torch.where(force_on, torch.ones_like(proposed), torch.where(force_off, torch.zeros_like(proposed), proposed))

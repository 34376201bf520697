"""Attaching routers to a Hugging Face decoder in place, PEFT-style.

Each decoder layer keeps its class, weights and submodule names; it gains a ``skip_routers``
ModuleDict and an instance-level ``forward`` that gates its two residual branches. The base
model's weights are never modified, and ``detach_routers`` gives back the plain model.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import RouterConfig
from ..errors import SkipGPTError
from .adapters import KINDS, ArchAdapter, get_adapter
from .forward import after_model_forward, before_model_forward, routed_layer_forward
from .routers import GATE_MODES, GateMode, Router, budget_gate, execute_gate, margin, topk_gate
from .sparsity import SparsityMeter, SparsityStats, gate_stats


class RoutingState:
    """Shared by all routed layers of one model: how gates are decided, and what the last
    forward decided (kept with gradients, so the trainer can put sparsity in the loss)."""

    def __init__(self, config: RouterConfig, adapter: ArchAdapter, module_params: torch.Tensor,
                 replacement_params: torch.Tensor | None = None):
        self.config = config
        self.adapter = adapter
        self.module_params = module_params
        # What a skipped (token, module) pair still costs: its replacement. Parameter ratios count
        # what is saved, module_params - replacement_params, so replacements are never free.
        self.replacement_params = torch.zeros_like(module_params) if replacement_params is None else replacement_params
        self.mode: GateMode = "argmax"
        self.checkpointing = False  # recompute each layer in backward to save activation memory
        # Inference (no gradient, deterministic gates) runs only what executes (engine.py);
        # False computes every branch and multiplies by the gate, the reference it must equal.
        self.skip_compute = True
        self.tau = 1.0
        self.noise = 1.0  # scale of the Gumbel noise in training (0: the argmax decision, straight-through)
        self.fixed_gates: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.gates: list[torch.Tensor | None] = [None] * len(module_params)
        self.meter: SparsityMeter | None = None
        self.margin_log: list[list[torch.Tensor]] | None = None  # argmax margins, for calibration
        # Callbacks (module index, branch input, gated branch output) for importance and analyses.
        self.observers: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = []
        self.hooks: list[Any] = []

    def skipping(self) -> bool:
        """Whether skipped modules are really not computed: at inference, not in training."""
        return self.skip_compute and self.mode != "gumbel" and not torch.is_grad_enabled()

    @property
    def num_modules(self) -> int:
        return len(self.module_params)

    @property
    def saved_params(self) -> torch.Tensor:
        """Parameters a skip saves per module: the weights of parameter ratios."""
        return self.module_params - self.replacement_params

    def decide(self, router: Router, hidden: torch.Tensor, index: int) -> torch.Tensor:
        if self.config.routing != "skipgpt" and self.mode in ("gumbel", "argmax"):
            gate = self._baseline_decision(router, hidden, index)
        elif self.mode == "dense":
            gate = hidden.new_ones(hidden.shape[:-1], dtype=torch.float32)
        elif self.mode == "fixed":
            if self.fixed_gates is None:
                raise SkipGPTError("gate mode 'fixed' needs gates: set_gate_mode(model, 'fixed', gates=...)")
            gate = self.fixed_gates[index].to(hidden.device, torch.float32).expand(hidden.shape[:-1])
        elif self.mode == "argmax" and self.margin_log is None and not torch.is_grad_enabled():
            gate = router.execute(hidden, self.config.threshold)  # bool, the inference fast path
        else:
            logits = router(hidden)
            gate = execute_gate(logits, self.mode, self.tau, self.config.threshold, self.noise)
            if self.margin_log is not None:
                real = margin(logits) if self.token_mask is None else margin(logits)[self.token_mask]
                self.margin_log[index].append(real.detach().flatten().cpu())
        self.gates[index] = gate
        return gate

    def _baseline_decision(self, router: Router, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """MoD-D's top-k per module, or D-LLM's one decision per layer under a per-token budget."""
        train = self.mode == "gumbel"
        if self.config.routing == "mod-d":
            return topk_gate(router(hidden), self.token_mask, self.config.capacity, train)
        if index % 2:  # D-LLM: the MLP follows its layer's decision
            return self.gates[index - 1]  # type: ignore[return-value]
        layer, layers = index // 2, self.num_modules // 2
        if train:
            proposed = execute_gate(router(hidden), "gumbel", self.tau, 0.0)
        else:
            proposed = router.execute(hidden, self.config.threshold)
        # Counted from the gates already decided in this forward, so a checkpointed layer that is
        # recomputed in backward sees the same count as in forward.
        executed = sum((g.detach().float() for g in self.gates[0 : 2 * layer : 2]), torch.zeros(hidden.shape[:-1], device=hidden.device))
        return budget_gate(proposed, executed, layer, layers, round(self.config.capacity * layers))

    def stacked_gates(self) -> torch.Tensor:
        if any(g is None for g in self.gates):
            raise SkipGPTError("no routed forward pass has run yet")
        return torch.stack([g.float() if g.dtype == torch.bool else g for g in self.gates])  # type: ignore[union-attr]

    def last_stats(self) -> SparsityStats:
        """Sparsity of the last forward pass, differentiable through the gates."""
        return gate_stats(self.stacked_gates(), self.token_mask, self.module_params, self.replacement_params)


def branch_parameter_counts(model: nn.Module, adapter: ArchAdapter) -> torch.Tensor:
    """Parameters per routable module (norms included: a skipped branch skips them too)."""
    counts = []
    for layer in adapter.decoder_layers(model):
        for kind in KINDS:
            counts.append(sum(p.numel() for m in adapter.branch(layer, kind) if m is not None for p in m.parameters()))
    return torch.tensor(counts, dtype=torch.float64)


def attach_routers(model: nn.Module, config: RouterConfig | None = None) -> nn.Module:
    """Add a router before every attention and MLP module of ``model``, in place."""
    if hasattr(model, "skipgpt_state"):
        raise SkipGPTError("this model already has routers; call detach_routers(model) first")
    adapter = get_adapter(model)
    config = RouterConfig(**(config or RouterConfig()).to_dict())
    layers = adapter.decoder_layers(model)
    text_config = model.config.get_text_config()
    config.model_type = model.config.model_type
    config.hidden_size = text_config.hidden_size
    config.num_layers = len(layers)
    config.base_model = config.base_model or str(getattr(model.config, "_name_or_path", ""))
    replacement_params = []
    for layer in layers:
        device = next(layer.parameters()).device
        layer.skip_routers = nn.ModuleDict({k: Router(config.hidden_size, config) for k in KINDS}).to(device)
        replacement_params += [r.replacement.cost() if r.replacement is not None else 0 for r in layer.skip_routers.values()]
    state = RoutingState(config, adapter, branch_parameter_counts(model, adapter),
                         torch.tensor(replacement_params, dtype=torch.float64))
    for index, layer in enumerate(layers):
        layer.skipgpt_index = index
        layer.skipgpt_state = state
        layer.forward = types.MethodType(routed_layer_forward, layer)
    state.hooks = [
        model.register_forward_pre_hook(lambda _m, a, k: before_model_forward(state, a, k), with_kwargs=True),
        model.register_forward_hook(lambda _m, _a, _o: after_model_forward(state)),
    ]
    model.skipgpt_state = state
    return model


def routing_state(model: nn.Module) -> RoutingState:
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    try:
        return model.skipgpt_state
    except AttributeError:
        raise SkipGPTError("this model has no routers: use attach_routers or load_routers first") from None


def has_routers(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "skipgpt_state")


def detach_routers(model: nn.Module) -> nn.Module:
    """Remove routers and hooks; the model is the plain base model again."""
    state = routing_state(model)
    for hook in state.hooks:
        hook.remove()
    for layer in state.adapter.decoder_layers(model):
        del layer.forward, layer.skip_routers, layer.skipgpt_index, layer.skipgpt_state
    del model.skipgpt_state
    return model


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    state = routing_state(model)
    return [p for layer in state.adapter.decoder_layers(model) for p in layer.skip_routers.parameters()]


def set_gate_mode(
    model: nn.Module, mode: GateMode, *, tau: float | None = None, noise: float | None = None,
    gates: torch.Tensor | None = None,
) -> None:
    """Switch between training (``gumbel``, with temperature ``tau`` and Gumbel ``noise`` scale),
    inference (``argmax``), no routing (``dense``) and externally given decisions (``fixed``,
    gates of shape [2L] or [2L, B, T])."""
    if mode not in GATE_MODES:
        raise SkipGPTError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    state = routing_state(model)
    state.mode = mode
    if tau is not None:
        state.tau = tau
    if noise is not None:
        state.noise = noise
    if mode == "fixed":
        if gates is None or gates.shape[0] != state.num_modules:
            raise SkipGPTError(f"fixed gates need a first dimension of {state.num_modules} (2 x layers)")
        state.fixed_gates = gates if gates.dim() == 3 else gates[:, None, None]


@contextlib.contextmanager
def gate_mode(model: nn.Module, mode: GateMode, **kwargs: Any) -> Iterator[RoutingState]:
    state = routing_state(model)
    saved = (state.mode, state.tau, state.noise, state.fixed_gates)
    set_gate_mode(model, mode, **kwargs)
    try:
        yield state
    finally:
        state.mode, state.tau, state.noise, state.fixed_gates = saved


@contextlib.contextmanager
def layer_outputs(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor] | None]:
    """The residual stream after each decoder layer, for the forwards inside the block (in order,
    with their gradients). Found through the routed layers themselves, so any wrapper (DDP, PEFT)
    around the model is fine."""
    if not enabled:
        yield None
        return
    layers = sorted((m for m in model.modules() if hasattr(m, "skipgpt_index")), key=lambda m: m.skipgpt_index)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def measure_sparsity(model: nn.Module) -> Iterator[SparsityMeter]:
    """Accumulate gate statistics over every forward inside the block."""
    state = routing_state(model)
    state.meter = SparsityMeter(state.module_params, state.replacement_params)
    try:
        yield state.meter
    finally:
        state.meter = None

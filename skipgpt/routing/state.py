"""The routing state one model's routed layers share: how gates are decided now, and what the
last forward decided."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import RouterConfig
from ..errors import SkipGPTError
from .adapters import ArchAdapter
from .paths import ENGINE_PATHS, PathCosts, measure_path_costs
from .routers import GateMode, Router, budget_gate, execute_gate, margin, topk_gate
from .sparsity import SparsityMeter, SparsityStats, gate_stats


class RoutingState:
    """Shared by all routed layers of one model: how gates are decided, and what the last
    forward decided (kept with gradients, so the trainer can put sparsity in the loss)."""

    def __init__(self, config: RouterConfig, adapter: ArchAdapter, module_params: torch.Tensor,
                 replacement_params: torch.Tensor | None = None, router_params: torch.Tensor | None = None):
        self.config = config
        self.adapter = adapter
        self.module_params = module_params
        # What a skipped (token, module) pair still costs: its replacement. Parameter ratios count
        # what is saved, module_params - replacement_params, so replacements are never free.
        self.replacement_params = torch.zeros_like(module_params) if replacement_params is None else replacement_params
        # What every token pays whatever it decides: its router's parameters (sparsity.py).
        self.router_params = torch.zeros_like(module_params) if router_params is None else router_params
        self.mode: GateMode = "argmax"
        self.checkpointing = False  # recompute each layer in backward to save activation memory
        # Inference (no gradient, deterministic gates) runs only what executes (engine.py);
        # False computes every branch and multiplies by the gate, the reference it must equal.
        self.skip_compute = True
        # How the engine computes a module some tokens skip: "auto" (the measured cost model of
        # paths.py), or "gather" / "dense" forced (tests, benchmarks).
        self.engine_path: str = "auto"
        self._path_costs: dict[torch.device, PathCosts] = {}
        self.tau = 1.0
        self.noise = 1.0  # scale of the Gumbel noise in training (0: the argmax decision, straight-through)
        self.fixed_gates: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self._token_masks: dict[torch.device, torch.Tensor] = {}  # the mask copied to each device of a device map
        self.gates: list[torch.Tensor | None] = [None] * len(module_params)
        self.meter: SparsityMeter | None = None
        self.margin_log: list[list[torch.Tensor]] | None = None  # argmax margins, for calibration
        # Callbacks (module index, branch input, gated branch output) for importance and analyses.
        self.observers: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = []
        self.hooks: list[Any] = []

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Which tokens of this forward are real (None: all of them)."""
        self.token_mask = mask
        self._token_masks = {} if mask is None else {mask.device: mask}

    def localize(self, device: torch.device) -> None:
        """Make ``token_mask`` the copy on ``device``, where the next layer computes: with a device
        map, consecutive layers may sit on different GPUs. One copy per device and forward."""
        mask = self.token_mask
        if mask is not None and mask.device != device:
            if device not in self._token_masks:
                self._token_masks[device] = mask.to(device, non_blocking=True)
            self.token_mask = self._token_masks[device]

    @property
    def drops_keys(self) -> bool:
        """KV policy ``drop`` in effect. Under gate mode ``dense`` every token executes and writes
        its keys, so the model takes its own path and cache (the dense verifier of speculative
        decoding relies on this)."""
        return self.config.kv_policy == "drop" and self.mode != "dense"

    def skipping(self) -> bool:
        """Whether skipped modules are really not computed. Always at inference; under gradient
        only with argmax decisions, which are frozen (their gradient is zero in the masked
        computation too): gathering the executing tokens is differentiable in everything else, so
        stage 2 (LoRA with frozen routers) trains through the skipping path and saves its compute."""
        return self.skip_compute and self.mode != "gumbel" and (self.mode == "argmax" or not torch.is_grad_enabled())

    def path(self, layer: nn.Module, kind: str, executing: int, tokens: int, device: torch.device) -> str:
        """"gather" or "dense" for a module in which ``executing`` of ``tokens`` real tokens run
        (:mod:`skipgpt.routing.paths`); measured once per device, on the first layer that asks."""
        if self.engine_path != "auto":
            if self.engine_path not in ENGINE_PATHS:
                raise SkipGPTError(f"engine_path must be one of {ENGINE_PATHS}, got {self.engine_path!r}")
            return self.engine_path
        costs = self._path_costs.get(device)
        if costs is None:
            offloaded = any(p.device.type == "meta" for p in layer.parameters())
            costs = PathCosts("") if offloaded else measure_path_costs(layer, self.adapter, device)
            self._path_costs[device] = costs
        return costs.choose(kind, executing, tokens)

    @property
    def num_modules(self) -> int:
        return len(self.module_params)

    @property
    def saved_params(self) -> torch.Tensor:
        """Parameters a skip saves per module: the weights of parameter ratios."""
        return self.module_params - self.replacement_params

    def decide(self, router: Router, hidden: torch.Tensor, index: int, normalised: torch.Tensor | None = None) -> torch.Tensor:
        """The execute gate of module ``index`` for ``hidden`` under the current mode; ``normalised``
        (``rms_normalised(hidden)``, where the layer has it) spares the router its own copy."""
        if self.mode == "argmax" and self.config.routing == "skipgpt" and self.margin_log is None and not torch.is_grad_enabled():
            gate = router.execute(hidden, self.config.threshold)  # bool, the inference fast path, tested first
        elif self.config.routing != "skipgpt" and self.mode in ("gumbel", "argmax"):
            gate = self._baseline_decision(router, hidden, index)
        elif self.mode == "dense":
            gate = hidden.new_ones(hidden.shape[:-1], dtype=torch.float32)
        elif self.mode == "fixed":
            if self.fixed_gates is None:
                raise SkipGPTError("gate mode 'fixed' needs gates: set_gate_mode(model, 'fixed', gates=...)")
            gate = self.fixed_gates[index].to(hidden.device, torch.float32).expand(hidden.shape[:-1])
        else:
            logits = router(hidden, normalised)
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
        executed = sum((g.detach().float().to(hidden.device) for g in self.gates[0 : 2 * layer : 2]),
                       torch.zeros(hidden.shape[:-1], device=hidden.device))
        return budget_gate(proposed, executed, layer, layers, round(self.config.capacity * layers))

    def stacked_gates(self) -> torch.Tensor:
        if any(g is None for g in self.gates):
            raise SkipGPTError("no routed forward pass has run yet")
        device = self.gates[0].device  # type: ignore[union-attr]  # the first layer's, with a device map
        return torch.stack([(g.float() if g.dtype == torch.bool else g).to(device) for g in self.gates])  # type: ignore[union-attr]

    def last_stats(self) -> SparsityStats:
        """Sparsity of the last forward pass, differentiable through the gates."""
        return gate_stats(self.stacked_gates(), self.token_mask, self.module_params, self.replacement_params, self.router_params)

    def new_meter(self) -> SparsityMeter:
        return SparsityMeter(self.module_params, self.replacement_params, self.router_params)

    @property
    def router_share(self) -> float:
        """The parameter ratio the routers cost every token (subtracted from what skips save)."""
        return float(self.router_params.sum() / self.module_params.sum())

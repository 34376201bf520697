"""Attaching routers to a Hugging Face decoder in place, PEFT-style.

Each decoder layer keeps its class, weights and submodule names; it gains a ``skip_routers``
ModuleDict and an instance-level ``forward`` that gates its two residual branches. The base
model's weights are never modified, and ``detach_routers`` gives back the plain model.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from .adapters import ArchAdapter, get_adapter
from .config import RouterConfig
from .engine import DroppedKVCache, drop_policy_mask, replace_skipped, skip_branch
from .errors import SkipGPTError
from .routers import GATE_MODES, GateMode, Router, budget_gate, execute_gate, margin, topk_gate
from .sparsity import SparsityMeter, SparsityStats, gate_stats

CONFIG_NAME = "router_config.json"
# Version 2 added replacements; a version-1 set was trained without them, whatever today's default.
FORMAT_VERSION = 2
WEIGHTS_NAME = "routers.safetensors"
KINDS = ("attn", "mlp")


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

    @property
    def drops_keys(self) -> bool:
        """KV policy ``drop`` in effect. Under gate mode ``dense`` every token executes and writes
        its keys, so the model takes its own path and cache (the dense verifier of speculative
        decoding relies on this)."""
        return self.config.kv_policy == "drop" and self.mode != "dense"

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


def _routed_layer_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``x + g·f(x)`` for the attention then the MLP branch; f includes the branch's norms.

    With activation checkpointing on (TuneConfig.gradient_checkpointing, or transformers'
    gradient_checkpointing_enable), the layer is recomputed in backward. The RNG state is
    replayed, so the recomputed Gumbel gates equal the ones the loss saw.
    """
    hf_checkpointing = getattr(self, "gradient_checkpointing", False) and self.training  # HF's own switch
    if (self.skipgpt_state.checkpointing or hf_checkpointing) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_routed_layer_body, self, hidden_states, use_reentrant=False, **kwargs)
    return _routed_layer_body(self, hidden_states, **kwargs)


def _routed_layer_body(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    state: RoutingState = self.skipgpt_state
    sparse = state.skipping()
    for offset, kind in enumerate(KINDS):
        index = 2 * self.skipgpt_index + offset
        norm, module, post_norm = state.adapter.branch(self, kind)
        router = self.skip_routers[kind]
        gate = state.decide(router, hidden_states, index)
        execute = (gate if gate.dtype == torch.bool else gate > 0) if sparse else None
        if execute is not None and state.token_mask is not None and state.mode != "dense":
            execute = execute & state.token_mask  # padding runs nothing; "dense" is the plain model's computation
        drop = kind == "attn" and state.drops_keys
        if execute is not None and (drop or not bool(execute.all() if execute.numel() > 1 else execute)):
            window = state.adapter.attention_window(module) if kind == "attn" else None
            update = skip_branch(kind, norm, module, post_norm, hidden_states, execute, kwargs, state.config.kv_policy, window)
            if router.replacement is not None:
                skipping = ~execute if state.token_mask is None else state.token_mask & ~execute
                update = replace_skipped(router.replacement, hidden_states, skipping, update)
        else:
            out = norm(hidden_states)
            if drop:  # the masked computation of "drop": keys of skipping tokens are hidden
                mask = drop_policy_mask(module, kwargs.get("attention_mask"), gate.detach() > 0.5, out.dtype,
                                        state.adapter.attention_window(module))
                out = module(hidden_states=out, **{**kwargs, "attention_mask": mask})[0]
            else:
                out = module(hidden_states=out, **kwargs)[0] if kind == "attn" else module(out)
            if post_norm is not None:
                out = post_norm(out)
            if execute is not None:
                update = out
            else:  # x + g·f(x) + (1 − g)·h(x): the straight-through gradient sees f − h
                g = gate.unsqueeze(-1).to(out.dtype)
                dense = router.replacement is None or state.mode == "dense"
                update = g * out if dense else g * out + (1 - g) * router.replacement(hidden_states)
        if state.observers:
            update = torch.zeros_like(hidden_states) if update is None else update
            for observe in state.observers:
                observe(index, hidden_states, update)
        if update is not None:
            hidden_states = hidden_states + update
    return hidden_states


def _before_model_forward(state: RoutingState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Record which tokens are real (padding must not count towards sparsity), and give KV
    policy "drop" its cache in place of the empty one transformers or ``generate`` would use."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    real = None if mask is None or ids is None else mask[:, -ids.shape[1] :].bool()
    state.token_mask = None if real is None or bool(real.all()) else real  # None: every token is real
    state.gates = [None] * state.num_modules
    if state.drops_keys and state.skipping() and kwargs.get("use_cache", True) is not False:
        name = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(name)
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            return args, {**kwargs, name: DroppedKVCache()}
    return None


def _after_model_forward(state: RoutingState) -> None:
    if state.meter is not None and all(g is not None for g in state.gates):
        state.meter.update(state.stacked_gates(), state.token_mask)


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
        layer.forward = types.MethodType(_routed_layer_forward, layer)
    state.hooks = [
        model.register_forward_pre_hook(lambda _m, a, k: _before_model_forward(state, a, k), with_kwargs=True),
        model.register_forward_hook(lambda _m, _a, _o: _after_model_forward(state)),
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


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same directory and rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def routers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = routing_state(model)
    return {
        f"layers.{i}.{name}": p.detach().cpu().contiguous()
        for i, layer in enumerate(state.adapter.decoder_layers(model))
        for name, p in layer.skip_routers.state_dict().items()
    }


def load_routers_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = routing_state(model)
    for i, layer in enumerate(state.adapter.decoder_layers(model)):
        prefix = f"layers.{i}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.skip_routers.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise SkipGPTError(f"router weights do not fit this model's layer {i}: {err}") from None


def save_routers(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """``router_config.json`` + ``routers.safetensors``: small, and loadable onto the base model."""
    state = routing_state(model)
    out = Path(out_dir)
    write_json(out / CONFIG_NAME, {"format": "skipgpt-routers", "version": FORMAT_VERSION, "router": state.config.to_dict(), **(extra or {})})
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(routers_state_dict(model), tmp, metadata={"format": "pt"}))
    return out


def read_router_config(router_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(router_dir) / CONFIG_NAME
    if not path.is_file():
        raise SkipGPTError(f"no {CONFIG_NAME} in {router_dir}: pass the output directory of 'skipgpt tune'")
    try:
        data = json.loads(path.read_text())
        if data.get("version", 1) < 2:
            data["router"] = {"replacement": "none", "replacement_rank": 0, **data["router"]}
        RouterConfig.from_dict(data["router"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise SkipGPTError(f"{path} is corrupt ({err}); re-run 'skipgpt tune' or restore the file") from None
    return data


def load_routers(model: nn.Module, router_dir: str | os.PathLike) -> nn.Module:
    """Attach routers saved by :func:`save_routers` onto ``model`` (refusing a different base)."""
    data = read_router_config(router_dir)
    config = RouterConfig.from_dict(data["router"])
    text_config = model.config.get_text_config()
    expected = (config.model_type, config.hidden_size, config.num_layers)
    actual = (model.config.model_type, text_config.hidden_size, len(get_adapter(model).decoder_layers(model)))
    if expected != actual:
        raise SkipGPTError(
            f"routers in {router_dir} were trained for a {expected[0]} model with hidden size {expected[1]} "
            f"and {expected[2]} layers (base {config.base_model!r}), but this model is a {actual[0]} with "
            f"hidden size {actual[1]} and {actual[2]} layers; load them onto the model they were trained on"
        )
    weights = Path(router_dir) / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise SkipGPTError(f"no {WEIGHTS_NAME} in {router_dir}") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise SkipGPTError(f"{weights} is corrupt ({err}); re-run 'skipgpt tune' or restore the file") from None
    attach_routers(model, config)
    try:
        load_routers_state_dict(model, tensors)
    except SkipGPTError:
        detach_routers(model)
        raise
    return model

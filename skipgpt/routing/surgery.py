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
from ..devices import input_device, module_device
from ..errors import SkipGPTError
from ..identity import revision, source_name, weights_fingerprint
from .adapters import KINDS, ArchAdapter, get_adapter
from .forward import after_model_forward, before_model_forward, routed_layer_forward
from .routers import GATE_MODES, GateMode, Router, argmax_straight_through
from .sparsity import SparsityMeter
from .state import RoutingState


def branch_parameter_counts(model: nn.Module, adapter: ArchAdapter) -> torch.Tensor:
    """Parameters per routable module (norms included: a skipped branch skips them too)."""
    counts = []
    for layer in adapter.decoder_layers(model):
        for kind in KINDS:
            counts.append(sum(p.numel() for m in adapter.branch(layer, kind) if m is not None for p in m.parameters()))
    # On the CPU explicitly: transformers builds a routed class's modules under a meta-device context.
    return torch.tensor(counts, dtype=torch.float64, device="cpu")


def describe_model(model: nn.Module) -> dict[str, object]:
    """What a model offers to route: its layers, routable modules and their parameter counts."""
    adapter = get_adapter(model)
    counts = branch_parameter_counts(model, adapter)
    return {
        "model_type": model.config.model_type,
        "layers": len(adapter.decoder_layers(model)),
        "routable_modules": len(counts),
        "hidden_size": model.config.get_text_config().hidden_size,
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "parameters_per_attention": int(counts[0::2].mean()),
        "parameters_per_mlp": int(counts[1::2].mean()),
        "attention_share_of_routable": float(counts[0::2].sum() / counts.sum()),
    }


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
    if not config.base_model:  # a set loaded from disk keeps the base it was made on
        config.base_model, config.base_revision = source_name(model), revision(model)
        config.base_fingerprint = weights_fingerprint(model) or ""
    replacement_params, router_params = [], []
    for layer in layers:
        routers = nn.ModuleDict({k: Router(config.hidden_size, config) for k in KINDS})
        # Built under a meta-device context (transformers' init of the routed class in hub.py, or
        # accelerate's init_empty_weights), routers stay on meta until loading fills them.
        layer.skip_routers = routers if _on_meta(routers) else routers.to(module_device(layer))
        replacement_params += [r.replacement.cost() if r.replacement is not None else 0 for r in layer.skip_routers.values()]
        router_params += [r.cost() for r in layer.skip_routers.values()]
    state = RoutingState(config, adapter, branch_parameter_counts(model, adapter),
                         torch.tensor(replacement_params, dtype=torch.float64, device="cpu"),
                         torch.tensor(router_params, dtype=torch.float64, device="cpu"))
    for index, layer in enumerate(layers):
        layer.skipgpt_index = index
        layer.skipgpt_state = state
        # Under accelerate's big-model hooks (device_map) ``forward`` is the hook's wrapper, which
        # moves inputs and onloads offloaded weights, around ``_old_forward``: route inside it.
        if hasattr(layer, "_hf_hook"):
            layer.skipgpt_hooked_forward = layer._old_forward
            layer._old_forward = types.MethodType(routed_layer_forward, layer)
        else:
            layer.forward = types.MethodType(routed_layer_forward, layer)
    # On the decoder itself, not the model around it: a call of the inner decoder (``model.model``,
    # ``get_decoder()``, what some pipelines and lm-eval wrappers do) then sets its own padding mask
    # instead of reusing the last top-level call's.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    state.hooks = [
        decoder.register_forward_pre_hook(lambda _m, a, k: before_model_forward(state, a, k), with_kwargs=True),
        decoder.register_forward_hook(lambda _m, _a, _o: after_model_forward(state)),
    ]
    model.skipgpt_state = state
    return model


def _on_meta(module: nn.Module) -> bool:
    return next(module.parameters()).device.type == "meta"


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
        if hasattr(layer, "skipgpt_hooked_forward"):
            layer._old_forward = layer.skipgpt_hooked_forward
            del layer.skipgpt_hooked_forward
        else:
            del layer.forward
        del layer.skip_routers, layer.skipgpt_index, layer.skipgpt_state
    del model.skipgpt_state
    return model


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    state = routing_state(model)
    return [p for layer in state.adapter.decoder_layers(model) for p in layer.skip_routers.parameters()]


def replacement_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What skipped modules leave behind (``RouterConfig.replacement``): trainable apart from the
    decisions, which stage 2 keeps frozen."""
    state = routing_state(model)
    return [p for layer in state.adapter.decoder_layers(model) for r in layer.skip_routers.values()
            if r.replacement is not None for p in r.replacement.parameters()]


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


def _routed_layers(model: nn.Module) -> list[nn.Module]:
    """The routed decoder layers in order, found through themselves, so that any wrapper (DDP,
    PEFT) around the model is fine."""
    return sorted((m for m in model.modules() if hasattr(m, "skipgpt_index")), key=lambda m: m.skipgpt_index)


@contextlib.contextmanager
def layer_outputs(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor] | None]:
    """The residual stream after each decoder layer, for the forwards inside the block (in order,
    with their gradients)."""
    if not enabled:
        yield None
        return
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in _routed_layers(model)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def observe_dense(model: nn.Module, sequences: torch.Tensor, observe: Observer, batch_size: int = 1) -> None:
    """Run ``sequences`` through the model with every module executing, calling ``observe(module
    index, branch input, branch output)`` for each module: the one pass that importance scores,
    replacement fits and analyses need."""
    state = routing_state(model)
    device = input_device(model)
    state.observers.append(observe)
    try:
        with gate_mode(model, "dense"):
            for batch in sequences.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        state.observers.remove(observe)


def deployed_gates(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Execute gates [2L, B, T] that argmax routing takes on ``batch``, differentiable in the router
    weights (:func:`argmax_straight_through` at the current τ).

    Taken along argmax routing's own path through the model: in a training forward, later modules
    see the hidden states the *sampled* decisions made, and deciding there by argmax is not what
    inference decides. So one extra no-grad forward records what each router sees, then each router
    runs again, with gradient, on its own input.
    """
    state = routing_state(model)
    inputs: list[torch.Tensor] = [torch.empty(0)] * state.num_modules

    def keep(index: int, hidden: torch.Tensor, _update: torch.Tensor) -> None:
        inputs[index] = hidden

    state.observers.append(keep)
    try:
        with torch.no_grad(), gate_mode(model, "argmax"):
            model(input_ids=batch, use_cache=False)
    finally:
        state.observers.remove(keep)
    routers = [layer.skip_routers[kind] for layer in _routed_layers(model) for kind in KINDS]
    return torch.stack([argmax_straight_through(r(x), state.tau, state.config.threshold) for r, x in zip(routers, inputs, strict=True)])


@contextlib.contextmanager
def measure_sparsity(model: nn.Module) -> Iterator[SparsityMeter]:
    """Accumulate gate statistics over every forward inside the block."""
    state = routing_state(model)
    state.meter = state.new_meter()
    try:
        yield state.meter
    finally:
        state.meter = None

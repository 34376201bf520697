"""The routed decoder layer: ``x + g·f(x)`` (plus ``(1 − g)·h(x)`` with a replacement) for the
attention then the MLP branch, and the model-level hooks around a forward.

One forward serves every architecture (the adapter names the branches) and every gate mode:
at inference with deterministic gates the skipping engine runs only what executes; in training
every branch is computed and multiplied by its gate, which the straight-through gradient needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import DynamicCache

from .execute import Decisions, dense_update, module_output, replace_skipped, skip_branch
from .kv import DroppedKVCache, drop_policy_mask
from .adapters import KINDS
from .routers import rms_normalised
from .state import RoutingState


def routed_layer_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``x + g·f(x)`` for the attention then the MLP branch; f includes the branch's norms.

    With activation checkpointing on (TuneConfig.gradient_checkpointing, or transformers'
    gradient_checkpointing_enable), the layer is recomputed in backward. The RNG state is
    replayed, so the recomputed Gumbel gates equal the ones the loss saw.
    """
    self.skipgpt_state.localize(hidden_states.device)
    hf_checkpointing = getattr(self, "gradient_checkpointing", False) and self.training  # HF's own switch
    if (self.skipgpt_state.checkpointing or hf_checkpointing) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_routed_layer_body, self, hidden_states, use_reentrant=False, **kwargs)
    return _routed_layer_body(self, hidden_states, **kwargs)


def _routed_layer_body(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    state: RoutingState = self.skipgpt_state
    sparse = state.skipping()
    dense_mode = state.mode == "dense"
    drops_keys = state.drops_keys
    routers = self.skip_routers
    for offset, kind in enumerate(KINDS):
        index = 2 * self.skipgpt_index + offset
        norm, module, post_norm = state.adapter.branch(self, kind)
        router = routers[kind]
        normalised = None if sparse else _shared_normalised(router, hidden_states, state)
        gate = state.decide(router, hidden_states, index, normalised)
        execute = (gate if gate.dtype == torch.bool else gate > 0) if sparse else None
        if execute is not None and state.token_mask is not None and not dense_mode:
            execute = execute & state.token_mask  # padding runs nothing; "dense" is the plain model's computation
        drop = drops_keys and kind == "attn"
        # The module's one host read; under "dense" every token executes and there is nothing to read.
        decisions = None if execute is None or dense_mode else Decisions.read(execute, state.token_mask)
        if decisions is not None and (drop or not decisions.all_execute):
            if not drop and decisions.executing.size and state.path(
                    self, kind, decisions.executing.size, decisions.tokens, hidden_states.device) == "dense":
                update = dense_update(kind, norm, module, post_norm, hidden_states, execute, kwargs)
            else:
                window = state.adapter.attention_window(module) if kind == "attn" else None
                update = skip_branch(kind, norm, module, post_norm, hidden_states, decisions, kwargs, state.config.kv_policy, window)
            if router.replacement is not None:
                update = replace_skipped(router.replacement, hidden_states, decisions, update)
        else:
            if drop:  # the masked computation of "drop": keys of skipping tokens are hidden
                mask = drop_policy_mask(module, kwargs.get("attention_mask"), gate.detach() > 0.5, hidden_states.dtype,
                                        state.adapter.attention_window(module))
                out = module_output(kind, norm, module, post_norm, hidden_states, {**kwargs, "attention_mask": mask})
            else:
                out = module_output(kind, norm, module, post_norm, hidden_states, kwargs)
            if execute is not None:
                update = out
            else:  # x + g·f(x) + (1 − g)·h(x): the straight-through gradient sees f − h
                g = gate.unsqueeze(-1).to(out.dtype)
                dense = router.replacement is None or state.mode == "dense"
                update = g * out if dense else g * out + (1 - g) * router.replacement(hidden_states, normalised)
        if state.observers:
            update = torch.zeros_like(hidden_states) if update is None else update
            for observe in state.observers:
                observe(index, hidden_states, update)
        if update is not None:
            hidden_states = hidden_states + update
    return hidden_states


def _shared_normalised(router: nn.Module, hidden: torch.Tensor, state: RoutingState) -> torch.Tensor | None:
    """``rms_normalised(hidden)`` once for the router and its low-rank replacement, where the
    masked computation runs both on every token (training, the reference computation): autograd
    then keeps one float32 copy of it for the two linear maps' weight gradients instead of two.
    Never at inference (the skipping engine), which the caller tests first."""
    if state.mode not in ("gumbel", "argmax"):
        return None
    replacement = router.replacement
    both = router.input_norm and replacement is not None and replacement.rank and state.config.routing == "skipgpt"
    return rms_normalised(hidden) if both else None


def before_model_forward(state: RoutingState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Record which tokens are real (padding must not count towards sparsity), and give KV
    policy "drop" its cache in place of the empty one transformers or ``generate`` would use."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    real = None if mask is None or ids is None else mask[:, -ids.shape[1] :].bool()
    state.set_token_mask(None if real is None or bool(real.all()) else real)  # None: every token is real
    state.gates = [None] * state.num_modules
    if state.drops_keys and state.skipping() and kwargs.get("use_cache", True) is not False:
        name = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(name)
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            return args, {**kwargs, name: DroppedKVCache()}
    return None


def after_model_forward(state: RoutingState) -> None:
    if state.meter is not None and all(g is not None for g in state.gates):
        state.meter.update(state.stacked_gates(), state.token_mask)



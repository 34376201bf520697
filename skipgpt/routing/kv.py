"""KV policy ``drop``: a token that skips a layer's attention writes no keys or values there.

Training applies it as a mask (:func:`drop_policy_mask`: queries see only keys of tokens that
execute that attention); inference stores only those keys, with their positions, in
:class:`DroppedKVCache`, so the cache shrinks with the attention skip rate. Policy ``keep`` (the
paper's) needs nothing here: every token writes its keys, as in the dense model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import SkipGPTError


class DroppedKVLayer(DynamicLayer):
    """One layer's keys and values under KV policy ``drop``: executing tokens only, each with its
    position (cache order) and, for batches, a validity flag (rows keep different numbers)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch = key_states.shape[0]
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
               new_tokens: int = 0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None or valid is None:
            raise SkipGPTError("DroppedKVCache holds keys for executing tokens only; it serves routers trained with KV policy 'drop'")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys.view(*key_states.shape[:2], -1, key_states.shape[-1]), key_states], dim=-2)
        self.values = torch.cat([self.values.view(*value_states.shape[:2], -1, value_states.shape[-1]), value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.seen += new_tokens
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen, not stored: what generation and mask sizes count in."""
        return self.seen if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens seen (transformers' convention: a negative
        count), by position, since stored slots are not tokens: speculative decoding rolls the
        draft back to what the dense model accepted. Slots no row holds any more are freed."""
        if tokens_to_remove > 0:
            raise SkipGPTError(f"crop takes the number of tokens to remove as a negative count, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.seen = max(self.seen + tokens_to_remove, 0)
        self.valid = self.valid & (self.positions < self.seen)
        slots = self.valid.any(0).nonzero().squeeze(1)
        self.keys, self.values = self.keys.index_select(2, slots), self.values.index_select(2, slots)
        self.positions, self.valid = self.positions[:, slots], self.valid[:, slots]


class DroppedKVCache(DynamicCache):
    """A cache for KV policy ``drop``: ``model.generate(..., cache=DroppedKVCache())``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = DroppedKVLayer

    def stored_tokens(self) -> int:
        """Key/value slots held over all layers (batch rows included)."""
        return sum(layer.keys.shape[0] * layer.keys.shape[2] for layer in self.layers if layer.is_initialized)


def kernel_mask(attn: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool "may attend" mask in the form the model's attention kernel takes."""
    if attn.config._attn_implementation == "eager":  # additive mask
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


def drop_policy_mask(attn: nn.Module, mask: torch.Tensor | None, execute: torch.Tensor, dtype: torch.dtype,
                     window: int | None) -> torch.Tensor:
    """Training-side (masked) KV policy ``drop`` for one layer without a cache: queries see only
    keys of tokens executing this attention. Each token keeps its own key so that no row is
    empty; a skipping token's output is multiplied by its zero gate. The mask is not
    differentiable: routers learn from their own token's gated output, as in D-LLM."""
    batch, tokens = execute.shape
    if mask is None:
        keys = torch.arange(tokens, device=execute.device)
        allowed = keys[None, :] <= keys[:, None]
        if window:
            allowed &= keys[None, :] > keys[:, None] - window
        allowed = allowed.expand(batch, 1, tokens, tokens)
    else:
        allowed = mask.bool() if mask.dtype == torch.bool else mask == 0
        allowed = allowed.expand(batch, -1, -1, -1)
    if allowed.shape[-1] != tokens:
        raise SkipGPTError("the masked computation of KV policy 'drop' runs without a KV cache (use_cache=False); "
                           "generation with 'drop' uses the skipping path and DroppedKVCache")
    self_key = torch.eye(tokens, dtype=torch.bool, device=execute.device)
    return kernel_mask(attn, allowed & (execute[:, None, None, :] | self_key), dtype)

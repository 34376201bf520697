"""Skipping for real: at inference a token that skips a module does not run it.

Training needs every branch computed (the gate's gradient flows through ``g·f(x)``); inference
does not. With argmax routing and no gradient, the routed layer calls :func:`skip_branch`,
which turns the gate into saved work:

* MLP: the executing tokens (whole batch, padding excluded) are gathered, run through the
  MLP, and their outputs scattered back into the residual stream.
* Attention, KV policy ``keep`` (what the routers were trained with): every token still
  produces its keys and values, so later tokens see it as before; only executing tokens
  compute queries, attention and the output projection. Queries are gathered per sequence
  (padded to the longest in the batch) and attend through the model's own attention kernel
  (SDPA or eager) with the causal/padding mask rows of their own positions.

* A skipping token gets its module's replacement where the router set has one (a learned
  vector, or a low-rank map of its hidden state: :class:`~skipgpt.routers.Replacement`),
  computed for the gathered skipping tokens only, never the module itself.

* Attention, KV policy ``drop`` (routers trained with ``--kv-policy drop``): a skipping token
  writes no keys or values at that layer and no later token attends to it there. Only executing
  tokens run any of the attention branch, and :class:`DroppedKVCache` stores their keys and
  values with their positions, so the KV cache shrinks with the skip rate.

``keep`` works with any Hugging Face cache and therefore with ``model.generate``; ``drop`` needs
:class:`DroppedKVCache` (``skipgpt.generate`` passes one). Branches in which every token
executes take the model's own code path unchanged, so "nothing skipped" costs only the routers.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import SkipGPTError

SUPPORTED_ATTENTION = ("sdpa", "eager")
KV_POLICIES = ("keep", "drop")


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


def skip_branch(
    kind: str, norm: nn.Module, module: nn.Module, post_norm: nn.Module | None,
    hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any], kv_policy: str = "keep",
    window: int | None = None,
) -> torch.Tensor | None:
    """The residual update of one branch, computed for executing tokens only.

    ``execute`` is a bool [B, T]; ``window`` the attention's sliding window, if any. Returns None
    where the branch leaves the stream unchanged.
    """
    if kind == "mlp":
        return _mlp_update(norm, module, post_norm, hidden, execute)
    if kv_policy == "drop":
        return _attention_update_drop(norm, module, post_norm, hidden, execute, kwargs, window)
    return _attention_update(norm, module, post_norm, hidden, execute, kwargs, window)


def _mlp_update(norm: nn.Module, mlp: nn.Module, post_norm: nn.Module | None,
                hidden: torch.Tensor, execute: torch.Tensor) -> torch.Tensor | None:
    index = execute.flatten().nonzero().squeeze(1)
    if index.numel() == 0:
        return None
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = mlp(norm(flat.index_select(0, index)))
    if post_norm is not None:
        out = post_norm(out)
    return torch.zeros_like(flat).index_copy_(0, index, out.to(flat.dtype)).view_as(hidden)


def replace_skipped(replacement: nn.Module, hidden: torch.Tensor, skipping: torch.Tensor,
                    update: torch.Tensor | None) -> torch.Tensor | None:
    """Add what skipping tokens get instead of the module (its :class:`~skipgpt.routers.Replacement`),
    computed on the gathered skipping tokens only; padding gets nothing."""
    index = skipping.flatten().nonzero().squeeze(1)
    if index.numel() == 0:
        return update
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = replacement(flat.index_select(0, index))
    base = torch.zeros_like(flat) if update is None else update.reshape(flat.shape)
    return base.index_add_(0, index, out.to(flat.dtype)).view_as(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d], with the per-head norm of Qwen3/Gemma3 where present."""
    x = x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def _attention_kernel(attn: nn.Module) -> Any:
    implementation = attn.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise SkipGPTError(
            f"the skipping inference path supports attn_implementation {SUPPORTED_ATTENTION}, this model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    eager = sys.modules[type(attn).__module__].eager_attention_forward  # the architecture's own eager kernel
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _query_mask(attn: nn.Module, mask: torch.Tensor | None, rows: torch.Tensor, positions: torch.Tensor,
                new_tokens: int, key_len: int, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Mask rows [R, 1, Tq, Tk] for the gathered queries: the model's own rows where it built
    a mask, otherwise causal (and sliding-window) in cache order."""
    if mask is not None:
        mask = mask.expand(int(rows.max()) + 1 if mask.shape[0] == 1 else mask.shape[0], -1, -1, -1)[rows]
        return torch.take_along_dim(mask, positions[:, None, :, None], dim=2)
    query_at = key_len - new_tokens + positions  # the current tokens are the last keys
    keys = torch.arange(key_len, device=positions.device)
    allowed = keys <= query_at[..., None]
    if window:
        allowed &= keys > query_at[..., None] - window
    return _kernel_mask(attn, allowed[:, None], dtype)


def _packed(execute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's executing positions first, in order, padded with its first one: ([R, W], valid [R, W])."""
    counts = execute.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    positions = torch.argsort((~execute).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=execute.device) < counts[:, None]
    return torch.where(valid, positions, positions[:, :1]), valid


def _kernel_mask(attn: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    return _kernel_mask(attn, allowed & (execute[:, None, None, :] | self_key), dtype)


def _attention_update_drop(norm: nn.Module, attn: nn.Module, post_norm: nn.Module | None,
                           hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any],
                           window: int | None) -> torch.Tensor | None:
    batch, new_tokens, _ = hidden.shape
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, DroppedKVCache):
        raise SkipGPTError("these routers use KV policy 'drop', which stores keys for executing tokens only: pass "
                           "cache=skipgpt.DroppedKVCache() (skipgpt.generate does this for you)")
    past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
    positions, valid = _packed(execute)  # [B, W]: the executing tokens are both the queries and the new keys
    rows = torch.arange(batch, device=hidden.device)[:, None]
    x = norm(hidden[rows, positions])
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.expand(batch, -1, -1)[rows, positions][:, None], sin.expand(batch, -1, -1)[rows, positions][:, None]
    head_dim = attn.head_dim
    keys = _rotate(_heads(attn.k_proj(x), head_dim, getattr(attn, "k_norm", None)), cos, sin)
    values = _heads(attn.v_proj(x), head_dim, None)
    at = past + positions
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx, positions=at, valid=valid, new_tokens=new_tokens)
        key_at, key_valid = cache.layers[attn.layer_idx].positions, cache.layers[attn.layer_idx].valid
    else:
        key_at, key_valid = at, valid
    if not bool(valid.any()):
        return None
    queries = _rotate(_heads(attn.q_proj(x), head_dim, getattr(attn, "q_norm", None)), cos, sin)
    allowed = key_valid[:, None, :] & (key_at[:, None, :] <= at[:, :, None])
    if window:
        allowed &= key_at[:, None, :] > at[:, :, None] - window
    allowed |= ~valid[:, :, None]  # padding query slots: any finite row, their output is dropped
    mask = _kernel_mask(attn, allowed[:, None], queries.dtype)
    return _attend(attn, post_norm, hidden, queries, keys, values, mask, rows[:, 0], positions, valid, window)


def _attention_update(norm: nn.Module, attn: nn.Module, post_norm: nn.Module | None,
                      hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any],
                      window: int | None) -> torch.Tensor | None:
    batch, new_tokens, _ = hidden.shape
    head_dim = attn.head_dim
    x = norm(hidden)
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    # Keys and values for every token: later tokens attend to them whether this one executes or not.
    keys = _rotate(_heads(attn.k_proj(x), head_dim, getattr(attn, "k_norm", None)), cos[:, None], sin[:, None])
    values = _heads(attn.v_proj(x), head_dim, None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx, kwargs=kwargs)
    rows = execute.any(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    positions, valid = _packed(execute[rows])
    take = lambda t: t[rows[:, None], positions]  # noqa: E731  [B, T, ...] -> [R, Tq, ...]
    queries = _rotate(_heads(attn.q_proj(take(x)), head_dim, getattr(attn, "q_norm", None)),
                      take(cos)[:, None], take(sin)[:, None])
    if rows.numel() < batch:
        keys, values = keys[rows], values[rows]
    mask = _query_mask(attn, kwargs.get("attention_mask"), rows, positions, new_tokens, keys.shape[2], queries.dtype, window)
    return _attend(attn, post_norm, hidden, queries, keys, values, mask, rows, positions, valid, window)


def _attend(attn: nn.Module, post_norm: nn.Module | None, hidden: torch.Tensor, queries: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
            positions: torch.Tensor, valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """Attention of the gathered queries [R, H, W, d] through the model's own kernel, the output
    projection for the valid ones, scattered back to (rows, positions) of a zero update."""
    extra: dict[str, Any] = {"sliding_window": window} if window else {}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        extra["softcap"] = attn.attn_logit_softcapping
    out, _ = _attention_kernel(attn)(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling, **extra)
    out = attn.o_proj(out.reshape(*positions.shape, -1)[valid])  # [executing tokens, D]
    if post_norm is not None:
        out = post_norm(out)
    update = torch.zeros_like(hidden)
    update[rows[:, None].expand_as(positions)[valid], positions[valid]] = out.to(hidden.dtype)
    return update

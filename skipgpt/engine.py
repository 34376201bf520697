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

It works with any Hugging Face cache and therefore with ``model.generate``. Branches in which
every token executes take the model's own code path unchanged, so "nothing skipped" costs only
the routers.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import SkipGPTError

SUPPORTED_ATTENTION = ("sdpa", "eager")


def skip_branch(
    kind: str, norm: nn.Module, module: nn.Module, post_norm: nn.Module | None,
    hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any],
) -> torch.Tensor | None:
    """The residual update of one branch, computed for executing tokens only.

    ``execute`` is a bool [B, T]. Returns None where the branch leaves the stream unchanged.
    """
    if kind == "mlp":
        return _mlp_update(norm, module, post_norm, hidden, execute)
    return _attention_update(norm, module, post_norm, hidden, execute, kwargs)


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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d], with the per-head norm of Qwen3/Gemma3 where present."""
    x = x.view(*x.shape[:-1], -1, head_dim)
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
                new_tokens: int, key_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Mask rows [R, 1, Tq, Tk] for the gathered queries: the model's own rows where it built
    a mask, otherwise causal (and sliding-window) in cache order."""
    if mask is not None:
        mask = mask.expand(int(rows.max()) + 1 if mask.shape[0] == 1 else mask.shape[0], -1, -1, -1)[rows]
        return torch.take_along_dim(mask, positions[:, None, :, None], dim=2)
    query_at = key_len - new_tokens + positions  # the current tokens are the last keys
    keys = torch.arange(key_len, device=positions.device)
    allowed = keys <= query_at[..., None]
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= keys > query_at[..., None] - window
    allowed = allowed[:, None]
    if attn.config._attn_implementation == "eager":  # additive mask
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


def _attention_update(norm: nn.Module, attn: nn.Module, post_norm: nn.Module | None,
                      hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
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
    # Each sequence's executing positions first (stable), padded with its first one.
    counts = execute[rows].sum(1)
    width = int(counts.max())
    positions = torch.argsort((~execute[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=hidden.device) < counts[:, None]
    positions = torch.where(valid, positions, positions[:, :1])
    take = lambda t: t[rows[:, None], positions]  # noqa: E731  [B, T, ...] -> [R, Tq, ...]
    queries = _rotate(_heads(attn.q_proj(take(x)), head_dim, getattr(attn, "q_norm", None)),
                      take(cos)[:, None], take(sin)[:, None])
    if rows.numel() < batch:
        keys, values = keys[rows], values[rows]
    mask = _query_mask(attn, kwargs.get("attention_mask"), rows, positions, new_tokens, keys.shape[2], queries.dtype)
    extra = {"sliding_window": attn.sliding_window} if getattr(attn, "sliding_window", None) else {}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        extra["softcap"] = attn.attn_logit_softcapping
    out, _ = _attention_kernel(attn)(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling, **extra)
    out = attn.o_proj(out.reshape(*positions.shape, -1)[valid])  # [executing tokens, D]
    if post_norm is not None:
        out = post_norm(out)
    update = torch.zeros_like(hidden)
    update[rows[:, None].expand_as(positions)[valid], positions[valid]] = out.to(hidden.dtype)
    return update

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
  vector, or a low-rank map of its hidden state: :class:`~skipgpt.routing.routers.Replacement`),
  computed for the gathered skipping tokens only, never the module itself.

* Attention, KV policy ``drop`` (routers trained with ``--kv-policy drop``): a skipping token
  writes no keys or values at that layer and no later token attends to it there. Only executing
  tokens run any of the attention branch, and :class:`DroppedKVCache` stores their keys and
  values with their positions, so the KV cache shrinks with the skip rate.

``keep`` works with any Hugging Face cache and therefore with ``model.generate``; ``drop`` needs
:class:`DroppedKVCache` (``skipgpt.generate`` passes one; see kv.py). Branches in which every token
executes take the model's own code path unchanged, so "nothing skipped" costs only the routers.

Which tokens execute decides the shapes of everything gathered, and a shape is a host value. Reading
one from the device stalls the stream until the device has caught up, so each routed module reads
its decisions once (:class:`Decisions`), derives every index, count and layout from that host copy,
and sends the indices back in copies that do not wait for the device (``tests/test_host_sync.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import SkipGPTError
from .kv import DroppedKVCache, kernel_mask

SUPPORTED_ATTENTION = ("sdpa", "eager")
KV_POLICIES = ("keep", "drop")


@dataclass(eq=False, slots=True)
class Decisions:
    """One routed module's decisions in this forward, on the host: bool [B, T] arrays of the
    tokens that execute (never padding) and of the real ones (None: all), and the flat indices
    of the executing tokens, all from a single device-to-host read (:meth:`read`).
    """

    execute: np.ndarray
    real: np.ndarray | None
    executing: np.ndarray

    @classmethod
    def read(cls, execute: torch.Tensor, real: torch.Tensor | None) -> Decisions:
        """The module's one host read; under padding the real-token mask travels in the same copy."""
        if real is None:
            execute_host, real_host = _to_host(execute), None
        else:
            execute_host, real_host = _to_host(torch.stack((execute, real)))
        return cls(execute_host, real_host, _where(execute_host))

    @property
    def tokens(self) -> int:
        """Real tokens of this forward (padding excluded)."""
        return self.execute.size if self.real is None else int(self.real.sum())

    @property
    def all_execute(self) -> bool:
        """Every token executes: the branch can run the model's own code."""
        return self.executing.size == self.execute.size

    @property
    def skipping(self) -> np.ndarray:
        """The real tokens that do not execute: they get the replacement."""
        return ~self.execute if self.real is None else self.real & ~self.execute


def _where(flags: np.ndarray) -> np.ndarray:
    """Flat indices of the set flags: ``np.flatnonzero`` without its Python wrappers, which cost
    more than the work itself at a decode step's sizes (this runs per module and token)."""
    return flags.ravel().nonzero()[0]


def _to_host(flags: torch.Tensor) -> np.ndarray:
    """The device-to-host read of a module's decisions: the one stall per routed module, in one
    place so that ``tests/test_host_sync.py`` can count it (on a CPU it is no profiler op)."""
    return flags.cpu().numpy()


def _upload(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Host index arrays as int64 tensors of the same shapes on ``device``.

    On a CPU each is copied into torch's own memory, nothing to wait for: packing and splitting
    would only add host work to every module of every decode step, and the gathers of a decode
    step ran measurably slower (about 10 µs each) on tensors that borrow numpy's memory.
    Elsewhere they travel in one copy; on CUDA from pinned memory without blocking, since a copy
    from pageable memory waits for the work already queued (a second stall per module). The
    caching host allocator keeps the pinned buffer until the copy has run.
    """
    if device.type == "cpu":
        return [torch.from_numpy(a.astype(np.int64, copy=False)).clone() for a in arrays]
    packed = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64, copy=False))
    pinned = device.type == "cuda"
    packed = (packed.pin_memory() if pinned else packed).to(device, non_blocking=pinned)
    return [part.view(a.shape) for part, a in zip(packed.split([a.size for a in arrays]), arrays)]


def _scattered(hidden: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A zero update shaped like ``hidden`` holding the rows of ``out`` at flat token ``index``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return torch.zeros_like(flat).index_copy_(0, index, out.to(flat.dtype)).view_as(hidden)


def module_output(kind: str, norm: nn.Module, module: nn.Module, post_norm: nn.Module | None,
                  hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The branch as the model computes it, for every token."""
    out = norm(hidden)
    out = module(hidden_states=out, **kwargs)[0] if kind == "attn" else module(out)
    return out if post_norm is None else post_norm(out)


def dense_update(kind: str, norm: nn.Module, module: nn.Module, post_norm: nn.Module | None,
                 hidden: torch.Tensor, execute: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The dense path (``routing/paths.py``): the branch for every token, kept for the executing
    ones (KV policy ``keep`` only: every token writes its keys, as the model's own code does).
    Where reading the weights costs what computing does, this is cheaper than a gather."""
    out = module_output(kind, norm, module, post_norm, hidden, kwargs)
    # Under autocast the branch may compute in bf16: the update keeps the stream's dtype, as a gather's scatter does.
    return torch.where(execute.unsqueeze(-1), out.to(hidden.dtype), 0)


def skip_branch(
    kind: str, norm: nn.Module, module: nn.Module, post_norm: nn.Module | None,
    hidden: torch.Tensor, decisions: Decisions, kwargs: dict[str, Any], kv_policy: str = "keep",
    window: int | None = None,
) -> torch.Tensor | None:
    """The residual update of one branch, computed for executing tokens only.

    ``window`` is the attention's sliding window, if any. Returns None where the branch leaves
    the stream unchanged.
    """
    if kind == "mlp":
        return _mlp_update(norm, module, post_norm, hidden, decisions)
    if kv_policy == "drop":
        return _attention_update_drop(norm, module, post_norm, hidden, decisions, kwargs, window)
    return _attention_update(norm, module, post_norm, hidden, decisions, kwargs, window)


def _mlp_update(norm: nn.Module, mlp: nn.Module, post_norm: nn.Module | None,
                hidden: torch.Tensor, decisions: Decisions) -> torch.Tensor | None:
    if decisions.executing.size == 0:
        return None
    (index,) = _upload(hidden.device, decisions.executing)
    out = mlp(norm(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)))
    if post_norm is not None:
        out = post_norm(out)
    return _scattered(hidden, index, out)


def replace_skipped(replacement: nn.Module, hidden: torch.Tensor, decisions: Decisions,
                    update: torch.Tensor | None) -> torch.Tensor | None:
    """Add what skipping tokens get instead of the module (its :class:`~skipgpt.routing.routers.Replacement`),
    computed on the gathered skipping tokens only; padding gets nothing."""
    skipping = _where(decisions.skipping)
    if skipping.size == 0:
        return update
    (index,) = _upload(hidden.device, skipping)
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
        mask = mask[rows] if mask.shape[0] > 1 else mask.expand(rows.shape[0], -1, -1, -1)
        return torch.take_along_dim(mask, positions[:, None, :, None], dim=2)
    query_at = key_len - new_tokens + positions  # the current tokens are the last keys
    keys = torch.arange(key_len, device=positions.device)
    allowed = keys <= query_at[..., None]
    if window:
        allowed &= keys > query_at[..., None] - window
    return kernel_mask(attn, allowed[:, None], dtype)


def _packed(execute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's executing positions first, in order, padded with its first one: ([R, W], valid [R, W])."""
    counts = execute.sum(1)
    width = int(counts.max()) if counts.size else 0
    order = np.argsort(~execute, axis=1, kind="stable")[:, :width]
    valid = np.arange(width) < counts[:, None]
    return np.where(valid, order, order[:, :1]), valid


def _attention_update_drop(norm: nn.Module, attn: nn.Module, post_norm: nn.Module | None,
                           hidden: torch.Tensor, decisions: Decisions, kwargs: dict[str, Any],
                           window: int | None) -> torch.Tensor | None:
    batch, new_tokens, _ = hidden.shape
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, DroppedKVCache):
        raise SkipGPTError("these routers use KV policy 'drop', which stores keys for executing tokens only: pass "
                           "cache=skipgpt.DroppedKVCache() (skipgpt.generate does this for you)")
    past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
    packed, slot_valid = _packed(decisions.execute)  # [B, W]: the executing tokens are both the queries and the new keys
    positions, valid, slots, target = _upload(hidden.device, packed, slot_valid, _where(slot_valid), decisions.executing)
    valid = valid.bool()  # uploaded as int64 with the indices
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
    if decisions.executing.size == 0:
        return None
    queries = _rotate(_heads(attn.q_proj(x), head_dim, getattr(attn, "q_norm", None)), cos, sin)
    allowed = key_valid[:, None, :] & (key_at[:, None, :] <= at[:, :, None])
    if window:
        allowed &= key_at[:, None, :] > at[:, :, None] - window
    allowed |= ~valid[:, :, None]  # padding query slots: any finite row, their output is dropped
    mask = kernel_mask(attn, allowed[:, None], queries.dtype)
    return _attend(attn, post_norm, hidden, queries, keys, values, mask, None if slot_valid.all() else slots, target, window)


def _attention_update(norm: nn.Module, attn: nn.Module, post_norm: nn.Module | None,
                      hidden: torch.Tensor, decisions: Decisions, kwargs: dict[str, Any],
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
    if decisions.executing.size == 0:
        return None
    active = _attending_rows(decisions.execute)
    packed, slot_valid = _packed(decisions.execute[active])
    rows, positions, slots, target = _upload(hidden.device, active, packed, _where(slot_valid), decisions.executing)
    take = lambda t: t[rows[:, None], positions]  # noqa: E731  [B, T, ...] -> [R, Tq, ...]
    queries = _rotate(_heads(attn.q_proj(take(x)), head_dim, getattr(attn, "q_norm", None)),
                      take(cos)[:, None], take(sin)[:, None])
    if active.size < batch:
        keys, values = keys[rows], values[rows]
    mask = _query_mask(attn, kwargs.get("attention_mask"), rows, positions, new_tokens, keys.shape[2], queries.dtype, window)
    return _attend(attn, post_norm, hidden, queries, keys, values, mask, None if slot_valid.all() else slots, target, window)


def _attending_rows(execute: np.ndarray) -> np.ndarray:
    """The batch rows whose queries attend: those with an executing token, or every row unless few
    have one. Attending with a subset of rows first copies their keys and values out of the cache
    (at decode, the whole cache of the layer) and then reads the copy: three passes over R rows'
    keys where attending with all B rows and dropping the queries of rows with nothing executing
    reads B once. For SmolLM2 in float32 at batch 8 after 1,024 tokens, with six rows attending,
    the copy is 6 rows × 3 KV heads × 1,088 positions × 64 × 2 (keys, values) × 4 bytes = 10 MB per
    layer and decode step, against 14 MB of weights the layer reads."""
    has_query = execute.any(1)
    count = int(has_query.sum())
    return _where(has_query) if 3 * count < execute.shape[0] else np.arange(execute.shape[0])


def _attend(attn: nn.Module, post_norm: nn.Module | None, hidden: torch.Tensor, queries: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None,
            target: torch.Tensor, window: int | None) -> torch.Tensor:
    """Attention of the gathered queries [R, H, W, d] through the model's own kernel, the output
    projection for the valid ones (``slots`` of the R·W, None: all), scattered to the flat token
    indices ``target`` of a zero update: the executing tokens in row-major order, which is the
    order of the valid slots."""
    extra: dict[str, Any] = {"sliding_window": window} if window else {}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        extra["softcap"] = attn.attn_logit_softcapping
    out, _ = _attention_kernel(attn)(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling, **extra)
    out = out.reshape(queries.shape[0] * queries.shape[2], -1)  # [R·W, H·d]
    out = attn.o_proj(out if slots is None else out.index_select(0, slots))
    if post_norm is not None:
        out = post_norm(out)
    return _scattered(hidden, target, out)

"""What a forward pass costs, module by module: the yardstick for "ideal" speedups.

A benchmark's speedup means little without the speedup that the skipped work allows. This
counts multiply-accumulate FLOPs per token from the routing decisions of a run:

* attention, KV policy ``keep``: keys and values are always computed; queries, the attention
  core (QKᵀ and PV over the keys the query sees) and the output projection only when executed;
  KV policy ``drop``: nothing for a skipping token, and a query sees only the keys of tokens
  that executed that layer's attention;
* MLP: all of it, only when executed;
* a skipped module's replacement, where the router set has one: one add of its vector, plus
  2·(2·d·r) for a rank-r map of the hidden state;
* the LM head for every position whose logits are computed.

Norms, routers, rotary embeddings and the embedding lookup are left out (they are small, and
the "nothing skipped" overhead is measured directly instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    layers: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        c = config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_attention_heads * head_dim,
                   c.num_key_value_heads * head_dim, c.vocab_size, c.num_hidden_layers)


@dataclass
class FlopCount:
    """Dense and executed FLOPs, accumulated over forwards."""

    dense: float = 0.0
    executed: float = 0.0

    @property
    def executed_fraction(self) -> float:
        return self.executed / self.dense if self.dense else 1.0

    @property
    def ideal_speedup(self) -> float:
        return self.dense / self.executed if self.executed else float("inf")

    def add(self, shape: ModelShape, context: torch.Tensor, token_mask: torch.Tensor,
            gates: torch.Tensor | None, logits_tokens: int, kv_policy: str = "keep",
            keys_before: torch.Tensor | None = None, replacement: float = 0.0) -> torch.Tensor | None:
        """One forward: ``context`` [B, T] keys each query sees, ``token_mask`` [B, T] real tokens,
        ``gates`` [2L, B, T] execute decisions (None: dense), ``logits_tokens`` LM-head positions,
        ``replacement`` the FLOPs a skipped (token, module) pair still costs (:func:`replacement_flops`).

        Under ``drop``, ``keys_before`` [L, B] counts the keys each layer already stores; the
        updated counts are returned for the next call.
        """
        real = token_mask.to(torch.float64)
        ctx = context.to(torch.float64) * real
        n = real.sum().item()
        kv = 2 * 2 * shape.hidden * shape.kv_dim
        qo = 2 * 2 * shape.hidden * shape.q_dim
        core = 2 * 2 * shape.q_dim  # per key seen
        mlp = 2 * 3 * shape.hidden * shape.intermediate
        head = 2.0 * shape.hidden * shape.vocab * logits_tokens
        per_layer_dense = n * (kv + qo + mlp) + core * ctx.sum().item()
        self.dense += shape.layers * per_layer_dense + head
        if gates is None:
            self.executed += shape.layers * per_layer_dense + head
            return None
        g = gates.to(torch.float64) * real
        attn, ffn = g[0::2], g[1::2]
        self.executed += replacement * (real.sum().item() * gates.shape[0] - g.sum().item())
        if kv_policy == "drop":
            before = torch.zeros(attn.shape[:2], dtype=torch.float64) if keys_before is None else keys_before
            seen = before[..., None] + attn.cumsum(-1)  # keys stored at this layer up to each query
            self.executed += (kv + qo) * attn.sum().item() + core * (attn * seen).sum().item() + mlp * ffn.sum().item() + head
            return before + attn.sum(-1)
        self.executed += (shape.layers * n * kv + qo * attn.sum().item() + core * (attn * ctx).sum().item()
                          + mlp * ffn.sum().item() + head)
        return None


def replacement_flops(hidden: int, replacement: str, rank: int) -> float:
    """FLOPs of one skipped module's replacement for one token (RouterConfig.replacement)."""
    if replacement == "none":
        return 0.0
    return float(hidden + (2 * 2 * hidden * rank if replacement == "lowrank" else 0))

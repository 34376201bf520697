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
* the routers: every token runs every router (one per module, two per layer) whatever it then
  decides: 2·d·2 for a ``linear`` router, 2·(d·d/4 + d/4·2) for the ``mlp`` one, plus 3·d for
  its RMS norm (:func:`router_flops`). They count in the executed FLOPs only: the dense count is
  the plain model without routers, so the ideal speedup (dense / executed) is what routing
  delivers against not routing at all, and falls below 1 when nothing is skipped;
* the LM head for every position whose logits are computed.

The model's own norms, rotary embeddings and the embedding lookup are left out (they are small,
and the "nothing skipped" overhead is measured directly instead).

:func:`routing_ceiling` uses the same count to say, from a model's config alone, what routing
can gain on it at all before any tuning (``skipgpt info`` prints it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import RouterConfig
from ..routing.routers import Router


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    layers: int
    tied: bool = False  # the LM head is the embedding matrix (stored, and read, once)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        c = config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        tied = getattr(c, "tie_word_embeddings", None)
        tied = getattr(config, "tie_word_embeddings", False) if tied is None else tied
        return cls(c.hidden_size, c.intermediate_size, c.num_attention_heads * head_dim,
                   c.num_key_value_heads * head_dim, c.vocab_size, c.num_hidden_layers, bool(tied))


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
            keys_before: torch.Tensor | None = None, replacement: float = 0.0,
            router: float = 0.0) -> torch.Tensor | None:
        """One forward: ``context`` [B, T] keys each query sees, ``token_mask`` [B, T] real tokens,
        ``gates`` [2L, B, T] execute decisions (None: dense), ``logits_tokens`` LM-head positions,
        ``replacement`` the FLOPs a skipped (token, module) pair still costs (:func:`replacement_flops`),
        ``router`` the FLOPs of one router for one token (:func:`router_flops`; 0 for a model
        without routers), added to the executed count for every real token and module.

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
        self.executed += router * n * 2 * shape.layers
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


def router_flops(hidden: int, router: str, input_norm: bool = True) -> float:
    """FLOPs of one router for one token (RouterConfig.router, RouterConfig.input_norm): its
    matmuls (``linear``: d -> 2; ``mlp``: d -> d/4 -> 2) and, with ``input_norm``, 3·d for the
    RMS norm (square, sum, scale). Biases and the ReLU are left out."""
    if router not in ("linear", "mlp"):
        raise ValueError(f"router must be 'linear' or 'mlp', got {router!r}")
    matmuls = 2 * hidden * 2 if router == "linear" else 2 * (hidden * (hidden // 4) + hidden // 4 * 2)
    return float(matmuls + (3 * hidden if input_norm else 0))


def routing_parameters(hidden: int, config: RouterConfig) -> tuple[int, int]:
    """Parameters of one router and of one module's replacement (both held in float32), counted
    by the modules themselves, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        router = Router(hidden, config)
    return router.cost(), 0 if router.replacement is None else router.replacement.cost()


# ---------------------------------------------------------------------------------------------
# The ceiling: what routing can gain on a model at all, from its config.

CEILING_RATIOS = (0.25, 0.40)
FLOP_COLUMNS = ("prefill", "score", "decode")  # FLOPs per token
BYTE_COLUMNS = ("decode_bytes", "weight_bytes")  # bytes read per decoded token at batch 1; bytes stored
PARTS = ("attention", "mlp", "embeddings", "lm_head", "routers")
COLUMN_NAMES = {"prefill": "prefill", "score": "scoring", "decode": "decoding compute",
                "decode_bytes": "batch-1 decoding", "weight_bytes": "weights stored"}
ROUTER_BYTES = 4  # routers and replacements keep float32 weights whatever the model's dtype


@dataclass(frozen=True)
class RoutingCeiling:
    """What routing can gain on a model before any tuning (:func:`routing_ceiling`).

    ``parts[column][part]``: for the FLOP columns, FLOPs per token of a ``context``-token prefill
    (logits at the last position, as generation computes them), a ``context``-token scoring
    window (logits at every position, as perplexity evaluation) and one decoding step that sees
    ``context`` keys; ``decode_bytes``: bytes read per decoding step at batch 1 (weights, the
    KV cache under attention); ``weight_bytes``: bytes stored. ``routers`` holds the routers'
    (and, for bytes stored, the replacements') cost, which routing adds.
    ``skippable[column]``: what skipping every module would remove (under ``keep`` a skipping
    token's keys and values are still computed, so K/V projections are not skippable).
    ``speedup[column][f"{ratio:g}"]``: the ideal speedup when ``ratio`` of every routable module's
    tokens skip (attention and MLP alike, so ``ratio`` of the routable parameters): dense plain
    model / routed model, routers and replacements included; FLOPs for the FLOP columns, bytes
    read for ``decode_bytes`` (batch-1 decoding is weight-bandwidth bound, and at batch 1 a
    skipped module's weights are not read at all).
    """

    context: int
    router: str
    replacement: str
    replacement_rank: int
    kv_policy: str
    tied_embeddings: bool
    bytes_per_param: float
    ratios: tuple[float, ...]
    parts: dict[str, dict[str, float]]
    skippable: dict[str, float]
    speedup: dict[str, dict[str, float]]

    def total(self, column: str) -> float:
        return sum(self.parts[column].values())

    def routable_share(self, column: str) -> float:
        """Share of ``column`` that lies in decoder attention and MLP modules."""
        return (self.parts[column]["attention"] + self.parts[column]["mlp"]) / self.total(column)

    def skippable_share(self, column: str) -> float:
        return self.skippable[column] / self.total(column)

    def warning(self, limit: float = 0.6) -> str | None:
        """One line when routing can skip less than ``limit`` of the compute or the bytes; else None."""
        worst = min(FLOP_COLUMNS, key=self.skippable_share)
        compute = self.skippable_share(worst)
        weights = min(self.skippable_share(c) for c in BYTE_COLUMNS)
        if min(compute, weights) >= limit:
            return None
        r, name = f"{self.ratios[0]:g}", COLUMN_NAMES[worst]
        return (f"warning: routing can skip at most {100 * compute:.0f} % of this model's compute ({name}) and "
                f"{100 * weights:.0f} % of its weight bytes; the ideal speedup at {100 * self.ratios[0]:.0f} % is "
                f"{self.speedup[worst][r]:.2f} × ({name}), "
                f"{self.speedup['decode_bytes'][r]:.2f} × (batch-1 decoding)")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["routable_share"] = {c: self.routable_share(c) for c in self.parts}
        out["skippable_share"] = {c: self.skippable_share(c) for c in self.parts}
        out["warning"] = self.warning()
        return out


def _flops(shape: ModelShape, tokens: int, last_context: int, logits: int, execute: float, kv_policy: str,
           router: float = 0.0, replacement: float = 0.0) -> FlopCount:
    """One forward of ``tokens`` tokens (the last sees ``last_context`` keys) with every module
    executed by the share ``execute`` of the tokens (an expectation: fractional gates)."""
    first = last_context - tokens + 1
    context = torch.arange(first, last_context + 1)[None]
    gates = torch.full((2 * shape.layers, 1, tokens), float(execute), dtype=torch.float64)
    before = torch.full((shape.layers, 1), execute * (first - 1), dtype=torch.float64)
    count = FlopCount()
    count.add(shape, context, torch.ones(1, tokens, dtype=torch.bool), gates, logits, kv_policy,
              keys_before=before, replacement=replacement, router=router)
    return count


def _decode_bytes(shape: ModelShape, context: int, execute: float, kv_policy: str, bytes_per_param: float) -> float:
    """Model bytes read by one batch-1 decoding step (routers aside): weights of the modules it
    executes, K/V projections as well under ``keep``, the KV cache of the layers whose attention
    it executes, and the LM head (the embedding matrix when tied; one embedding row is left out)."""
    d, L = shape.hidden, shape.layers
    kv_w, qo_w, mlp_w = 2 * d * shape.kv_dim, 2 * d * shape.q_dim, 3 * d * shape.intermediate
    keys = context * (execute if kv_policy == "drop" else 1.0)  # keys stored at a layer, expected
    cache = 2 * shape.kv_dim * keys
    per_layer = execute * (qo_w + mlp_w + cache) + (kv_w if kv_policy == "keep" else execute * kv_w)
    return (L * per_layer + shape.vocab * d) * bytes_per_param


def routing_ceiling(config, router: RouterConfig | None = None, context: int = 1024,
                    ratios: tuple[float, ...] = CEILING_RATIOS, bytes_per_param: float = 4.0) -> RoutingCeiling:
    """What routing can gain on a model (an HF config or a :class:`ModelShape`) at all.

    ``router``: the router set's architecture (default: :class:`RouterConfig`'s defaults), for
    the cost of routers and replacements and the KV policy. ``bytes_per_param``: the model
    weights' (and KV cache's) element size. Norm weights and biases are left out.
    """
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    rc = router or RouterConfig()
    d, L, policy = shape.hidden, shape.layers, rc.kv_policy
    r_flops = router_flops(d, rc.router, rc.input_norm)
    rep_flops = replacement_flops(d, rc.replacement, rc.replacement_rank)
    r_params, rep_params = routing_parameters(d, rc)
    attn_w = 2 * d * shape.q_dim + 2 * d * shape.kv_dim
    mlp_w = 3 * d * shape.intermediate
    parts: dict[str, dict[str, float]] = {}
    skippable: dict[str, float] = {}
    speedup: dict[str, dict[str, float]] = {}
    for column, tokens, logits in (("prefill", context, 1), ("score", context, context), ("decode", 1, 1)):
        mlp = 2 * 3 * d * shape.intermediate * L * tokens
        head = 2 * d * shape.vocab * logits
        plain = _flops(shape, tokens, context, logits, 1.0, policy)
        parts[column] = {k: v / tokens for k, v in (
            ("attention", plain.dense - mlp - head), ("mlp", mlp), ("embeddings", 0.0), ("lm_head", head),
            ("routers", r_flops * 2 * L * tokens))}
        nothing = _flops(shape, tokens, context, logits, 0.0, policy)
        skippable[column] = (nothing.dense - nothing.executed) / tokens
        speedup[column] = {
            f"{r:g}": _flops(shape, tokens, context, logits, 1 - r, policy, r_flops, rep_flops).ideal_speedup
            for r in ratios}
    routing_bytes = 2 * L * r_params * ROUTER_BYTES
    dense_read = _decode_bytes(shape, context, 1.0, policy, bytes_per_param)
    head_bytes = shape.vocab * d * bytes_per_param
    mlp_bytes = L * mlp_w * bytes_per_param
    parts["decode_bytes"] = {"attention": dense_read - head_bytes - mlp_bytes, "mlp": mlp_bytes, "embeddings": 0.0,
                             "lm_head": head_bytes, "routers": float(routing_bytes)}
    skippable["decode_bytes"] = dense_read - _decode_bytes(shape, context, 0.0, policy, bytes_per_param)
    speedup["decode_bytes"] = {
        f"{r:g}": dense_read / (_decode_bytes(shape, context, 1 - r, policy, bytes_per_param) + routing_bytes
                                + r * 2 * L * rep_params * ROUTER_BYTES)
        for r in ratios}
    parts["weight_bytes"] = {"attention": L * attn_w * bytes_per_param, "mlp": mlp_bytes, "embeddings": head_bytes,
                             "lm_head": 0.0 if shape.tied else head_bytes,
                             "routers": float(2 * L * (r_params + rep_params) * ROUTER_BYTES)}
    kv_w = 0 if policy == "drop" else 2 * d * shape.kv_dim
    skippable["weight_bytes"] = L * (attn_w - kv_w + mlp_w) * bytes_per_param
    return RoutingCeiling(context, rc.router, rc.replacement, rc.replacement_rank, policy, shape.tied,
                          bytes_per_param, tuple(ratios), parts, skippable, speedup)

"""Dynamic routing baselines: routers trained like SkipGPT-RT (same data, steps, loss, frozen
model) but deciding by another rule, set in their RouterConfig (``routing``, ``capacity``).

MoD-D (Raposo et al. 2024, decoupled as in SkipGPT's appendix C): every attention and MLP
module executes the top ``capacity = 1 − target`` share of each sequence's tokens, so every
module, and the whole model, skips exactly the target. D-LLM (Jiang et al. 2024): one decision
per token per layer, attention and MLP together, each token executing round((1 − target) · L)
layers, and the KV-cache eviction of skipped layers (KV policy "drop").
"""

from __future__ import annotations

import dataclasses

from ..config import RouterConfig
from .registry import DynamicMethod, register


def dynamic_router_config(name: str, target: float, base: RouterConfig | None = None) -> RouterConfig:
    """The router config of a dynamic baseline at ``target`` skipped share."""
    base = base or RouterConfig()
    # The baselines skip to nothing, as published; replacements are SkipGPT-RT's own lever.
    plain = dict(capacity=1.0 - target, replacement="none", replacement_rank=0)
    if name == "mod-d":
        return dataclasses.replace(base, routing="mod-d", kv_policy="keep", **plain)
    if name == "d-llm":
        return dataclasses.replace(base, routing="d-llm", kv_policy="drop", **plain)
    if name == "skipgpt-rt-paper":
        return dataclasses.replace(base, routing="skipgpt", replacement="none", replacement_rank=0)
    return dataclasses.replace(base, routing="skipgpt")


register(DynamicMethod("skipgpt-rt", "SkipGPT router tuning (stage 1) with today's default recipe", label="SkipGPT-RT"))
register(DynamicMethod("skipgpt-rt-paper", "SkipGPT router tuning with the paper's recipe: skipped modules leave nothing, "
                                           "next-token NLL loss", label="SkipGPT-RT (paper's recipe: skip to nothing, NLL)",
                       tune_overrides=(("loss", "nll"),)))
register(DynamicMethod("mod-d", "top-k tokens per module (Mixture-of-Depths, attention and MLP decoupled)", label="MoD-D"))
register(DynamicMethod("d-llm", "one decision per token per layer, per-token budget, KV eviction of skipped layers", label="D-LLM"))

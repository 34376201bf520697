"""The training objectives every stage shares: what the routed model is compared against.

LM term: next-token NLL (the paper's), or the KL divergence to a teacher's next-token
distribution (by default the same frozen model with every module executing), which gives every
token a full target for one extra no-grad forward. Optional hidden-state term: the routed
residual stream's distance to the teacher's after every layer. Stage 1 adds α·|T − r|.

Both LM terms are computed from the final hidden states, never from full logits, a chunk of
tokens at a time (skipgpt/next_token.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TuneConfig
from ..next_token import final_hidden_states, kl_divergence, next_token_nll
from ..routing.sparsity import gate_stats
from ..routing.surgery import deployed_gates, gate_mode, layer_outputs, routing_state

# A teacher returns its final hidden states [B, T, d] (model dtype; the input of the output
# embedding, whose log-probabilities the loss computes chunk by chunk) and, if asked, its residual
# stream after every layer.
TeacherOutput = tuple[torch.Tensor, "list[torch.Tensor] | None"]
Teacher = Callable[[torch.nn.Module, torch.Tensor, bool], TeacherOutput]

def dense_outputs(model: torch.nn.Module, batch: torch.Tensor, hidden: bool = False) -> TeacherOutput:
    """The frozen dense model's final hidden states (the distillation target) and, if asked, its
    residual stream after every layer."""
    with torch.no_grad(), gate_mode(model, "dense"), layer_outputs(model, hidden) as states:
        return final_hidden_states(model, batch), states


def hidden_state_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the squared error to the dense residual stream, relative to its power:
    every layer counts the same although SmolLM2's stream grows by orders of magnitude with depth."""
    device = student[-1].device  # where the LM loss is, with a device map
    return torch.stack([((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp(min=1e-12)).to(device)
                        for s, t in zip(student, teacher, strict=True)]).mean()


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, loss: str, teacher: Teacher = dense_outputs,
            hidden_weight: float = 0.0, chunk_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token NLL, or KL to ``teacher``'s next-token distribution (by default the same model,
    dense), plus ``hidden_weight`` × :func:`hidden_state_loss`; returns (total, its parts).
    ``chunk_tokens``: tokens per chunk of float32 logits (default: :func:`logit_chunk_tokens`)."""
    hidden = hidden_weight > 0
    # The teacher runs first: every forward overwrites the gates the sparsity loss reads.
    target, target_states = teacher(model, batch, hidden) if loss == "kl" else (None, None)
    with layer_outputs(model, hidden) as states:
        final = final_hidden_states(model, batch)
    if target is None:
        lm = next_token_nll(model, final, batch, chunk_tokens=chunk_tokens)
    else:
        lm = kl_divergence(model, target, final, chunk_tokens)
    if not hidden:
        return lm, {"lm_loss": lm}
    distance = hidden_state_loss(target_states, states)
    return lm + hidden_weight * distance, {"lm_loss": lm, "hidden_loss": distance}


def routed_loss(
    model: torch.nn.Module, batch: torch.Tensor, cfg: TuneConfig, teacher: Teacher = dense_outputs
) -> tuple[torch.Tensor, dict[str, float]]:
    """LM loss + α·|T − r| of one micro-batch under the current gate mode, with its parts for the log."""
    lm, lm_parts = lm_loss(model, batch, cfg.loss, teacher, cfg.hidden_distill)
    state = routing_state(model)
    stats = state.last_stats()  # read before deployed_gates' forward overwrites the gates
    # MoD-D and D-LLM meet their budget by construction (top-k, per-token budget): no penalty.
    fixed_budget = state.config.routing != "skipgpt"
    counted = stats
    if cfg.sparsity_of == "argmax" and not fixed_budget:  # steer the deployed ratio; the LM loss still sees the samples
        counted = gate_stats(deployed_gates(model, batch), state.token_mask, state.module_params, state.replacement_params,
                             state.router_params)
    sparsity = counted.value(cfg.target_unit)
    penalty = sparsity.new_zeros(()) if fixed_budget else cfg.alpha * (cfg.target - sparsity).abs()
    logged = {**lm_parts, "sparsity_loss": penalty, "sparsity": sparsity, "module_sparsity": stats.module,
              "param_ratio": stats.params, "attn_sparsity": stats.attn, "mlp_sparsity": stats.mlp}
    if cfg.sparsity_of == "argmax":
        logged["sampled_sparsity"] = stats.value(cfg.target_unit)
    parts = dict(zip(logged, torch.stack([v.detach().float().to(lm.device) for v in logged.values()]).tolist()))  # one host sync
    return lm + penalty.to(lm.device), parts  # with a device map the gates sit on the first layer's device

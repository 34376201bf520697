"""The training objectives every stage shares: what the routed model is compared against.

LM term: next-token NLL (the paper's), or the KL divergence to a teacher's next-token
distribution (by default the same frozen model with every module executing), which gives every
token a full target for one extra no-grad forward. Optional hidden-state term: the routed
residual stream's distance to the teacher's after every layer. Stage 1 adds α·|T − r|.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import TuneConfig
from ..routing.sparsity import gate_stats
from ..routing.surgery import deployed_gates, gate_mode, layer_outputs, routing_state

TeacherOutput = tuple[torch.Tensor, "list[torch.Tensor] | None"]
Teacher = Callable[[torch.nn.Module, torch.Tensor, bool], TeacherOutput]


def dense_outputs(model: torch.nn.Module, batch: torch.Tensor, hidden: bool = False) -> TeacherOutput:
    """The frozen dense model's logits (the distillation target) and, if asked, its residual
    stream after every layer."""
    with torch.no_grad(), gate_mode(model, "dense"), layer_outputs(model, hidden) as states:
        return model(input_ids=batch, use_cache=False).logits.float(), states


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student): zero exactly when the routed model is dense."""
    log_p = F.log_softmax(teacher_logits.float(), -1)
    log_q = F.log_softmax(student_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def hidden_state_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the squared error to the dense residual stream, relative to its power:
    every layer counts the same although SmolLM2's stream grows by orders of magnitude with depth."""
    return torch.stack([(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp(min=1e-12)
                        for s, t in zip(student, teacher, strict=True)]).mean()


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, loss: str, teacher: Teacher = dense_outputs,
            hidden_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token NLL, or KL to ``teacher``'s logits (by default the same model, dense), plus
    ``hidden_weight`` × :func:`hidden_state_loss`; returns (total, its parts)."""
    hidden = hidden_weight > 0
    # The teacher runs first: every forward overwrites the gates the sparsity loss reads.
    target, target_states = teacher(model, batch, hidden) if loss == "kl" else (None, None)
    with layer_outputs(model, hidden) as states:
        out = model(input_ids=batch, labels=batch if target is None else None, use_cache=False)
    lm = out.loss if target is None else kl_divergence(target, out.logits)
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
        counted = gate_stats(deployed_gates(model, batch), state.token_mask, state.module_params, state.replacement_params)
    sparsity = counted.value(cfg.target_unit)
    penalty = sparsity.new_zeros(()) if fixed_budget else cfg.alpha * (cfg.target - sparsity).abs()
    logged = {**lm_parts, "sparsity_loss": penalty, "sparsity": sparsity, "module_sparsity": stats.module,
              "param_ratio": stats.params, "attn_sparsity": stats.attn, "mlp_sparsity": stats.mlp}
    if cfg.sparsity_of == "argmax":
        logged["sampled_sparsity"] = stats.value(cfg.target_unit)
    parts = {k: float(v.detach()) for k, v in logged.items()}
    return lm + penalty, parts

"""The training objectives every stage shares: what the routed model is compared against.

LM term: next-token NLL (the paper's), or the KL divergence to a teacher's next-token
distribution (by default the same frozen model with every module executing), which gives every
token a full target for one extra no-grad forward. Optional hidden-state term: the routed
residual stream's distance to the teacher's after every layer. Stage 1 adds α·|T − r|.

Both LM terms are computed from the final hidden states (the input of the output embedding),
never from full logits: the model's forward computes no logits at all (:func:`final_hidden_states`),
and the loss projects ``chunk_tokens`` tokens at a time onto the vocabulary, in float32, each
chunk under activation checkpointing. At a 128k vocabulary the float32 logits of a micro-batch
are the largest tensors of a step (4 × 2,048 tokens: 4.2 GB each, and the KL held about five);
chunked, memory holds one chunk's (≤ :data:`LOGIT_CHUNK_BYTES` each). Values and gradients equal
the unchunked computation (tests/test_losses.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import TuneConfig
from ..errors import SkipGPTError
from ..routing.sparsity import gate_stats
from ..routing.surgery import deployed_gates, gate_mode, layer_outputs, routing_state

# A teacher returns its final hidden states [B, T, d] (model dtype; the input of the output
# embedding, whose log-probabilities the loss computes chunk by chunk) and, if asked, its residual
# stream after every layer.
TeacherOutput = tuple[torch.Tensor, "list[torch.Tensor] | None"]
Teacher = Callable[[torch.nn.Module, torch.Tensor, bool], TeacherOutput]

# One chunk's float32 logits take at most this many bytes: 523 tokens at Llama 3's 128,256
# vocabulary, 1,365 at SmolLM2's 49,152. Large enough that the head's matmul stays efficient
# (hundreds of rows of a d × V product), small enough that a KL chunk's working set (two logits
# tensors, their log-softmaxes and the pointwise KL, about five of these) stays near 1.3 GB where
# one full [4, 2048, 128256] float32 tensor is 4.2 GB. Pass ``chunk_tokens`` to override it.
LOGIT_CHUNK_BYTES = 256 * 2**20
IGNORE_INDEX = -100  # Hugging Face's label for "no target" (padding), as its loss uses it


def logit_chunk_tokens(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk's float32 logits fit ``budget_bytes`` (by default
    :data:`LOGIT_CHUNK_BYTES`, read at call time so that setting the constant takes effect), at least 1."""
    return max(1, (budget_bytes or LOGIT_CHUNK_BYTES) // (4 * vocab_size))


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DistributedDataParallel and PEFT wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class OutputHead:
    """The model's output embedding and the final logit soft-capping its forward applies after
    it (Gemma 2: ``cap · tanh(logits / cap)``, in the head's output dtype, as Hugging Face does)."""

    linear: torch.nn.Module
    softcap: float | None
    vocab_size: int

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of ``hidden`` [..., d]: what ``model(...).logits.float()`` would hold."""
        logits = self.linear(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


def output_head(model: torch.nn.Module) -> OutputHead:
    lm = _causal_lm(model)
    linear = lm.get_output_embeddings()
    if linear is None:
        raise SkipGPTError(f"{type(lm).__name__} has no output embedding to compute the LM loss from")
    vocab = getattr(linear, "out_features", None) or lm.config.get_text_config().vocab_size
    return OutputHead(linear, getattr(lm.config, "final_logit_softcapping", None), vocab)


@contextlib.contextmanager
def _captured_head_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Keep what enters the output embedding in the forwards inside the block, and hand the head
    zero positions instead: the model's forward then computes no logits (``[B, 0, V]``) whatever
    its architecture or wrappers, and the loss projects the kept states chunk by chunk."""
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            captured.append(args[0])
            return (args[0][..., :0, :], *args[1:]), kwargs
        captured.append(kwargs["input"])
        return args, {**kwargs, "input": kwargs["input"][..., :0, :]}

    handle = output_head(model).linear.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(model: torch.nn.Module, batch: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """One forward of ``model`` (DDP- or PEFT-wrapped or not) on ``batch``: the final hidden states
    [B, T, d] the output embedding would project, in the model's dtype, with their gradient;
    no logits are computed."""
    with _captured_head_input(model) as captured:
        model(input_ids=batch, use_cache=False, **kwargs)
    if len(captured) != 1:
        raise SkipGPTError(f"expected the output embedding to run once in a forward, it ran {len(captured)} times")
    return captured[0]


def _chunked_sum(fn: Callable[..., torch.Tensor], chunk_tokens: int, *tokens: torch.Tensor) -> torch.Tensor:
    """``fn(*chunk)`` summed over chunks of ``chunk_tokens`` rows of ``tokens`` (equal first dims).

    With autograd on and more than one chunk, each chunk runs under non-reentrant activation
    checkpointing: its float32 logits are recomputed in backward instead of saved, so the graph
    holds the chunk inputs only (views of ``tokens``), never every chunk's [chunk, V] tensors. One
    chunk is not recomputed: it holds no more than a chunk, and on a small model the output head is
    a fifth of a step's compute (SmolLM2: 28 M of 135 M parameters), which recomputing would add
    to every CPU-budgeted step. The RNG state is not replayed: a chunk draws no random numbers. No
    host synchronisation in the loop.
    """
    if chunk_tokens < 1:
        raise SkipGPTError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    checkpointed = torch.is_grad_enabled() and tokens[0].shape[0] > chunk_tokens
    parts = []
    for start in range(0, tokens[0].shape[0], chunk_tokens):
        chunk = [t[start : start + chunk_tokens] for t in tokens]
        parts.append(torch.utils.checkpoint.checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False)
                     if checkpointed else fn(*chunk))
    return torch.stack(parts).sum()


def next_token_nll(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean",
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """Next-token NLL of ``labels`` [B, T] from the final hidden states [B, T, d], as Hugging Face's
    ``model(..., labels=labels).loss``: position t predicts label t+1, labels equal to
    :data:`IGNORE_INDEX` count for nothing, ``"mean"`` over the predicted tokens (B·(T−1) without
    padding labels) or their ``"sum"``. Chunked over tokens (``chunk_tokens``, by default
    :func:`logit_chunk_tokens`)."""
    if reduction not in ("mean", "sum"):
        raise SkipGPTError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    head = output_head(model)
    targets = labels[:, 1:].flatten()
    states = hidden[:, :-1].flatten(0, 1)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head.logits(h)  # on the head's device, which a device map may set apart
        return F.cross_entropy(logits, t.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum")

    total = _chunked_sum(chunk_nll, chunk_tokens or logit_chunk_tokens(head.vocab_size), states, targets)
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().to(total.device)


def sequence_nll(model: torch.nn.Module, batch: torch.Tensor, *, reduction: str = "mean",
                 chunk_tokens: int | None = None) -> torch.Tensor:
    """Next-token NLL of ``batch`` [B, T] under ``model`` (one forward), without full logits."""
    return next_token_nll(model, final_hidden_states(model, batch), batch, reduction=reduction, chunk_tokens=chunk_tokens)


def kl_divergence(model: torch.nn.Module, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                  chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) between the next-token distributions that
    ``model``'s output head gives the two final hidden states [B, T, d]: zero exactly when the
    routed model is dense. Chunked over tokens; the teacher's log-probabilities are recomputed per
    chunk from its hidden states (a d-wide tensor kept instead of a V-wide one)."""
    head = output_head(model)
    teacher = teacher_hidden.flatten(0, -2).to(student_hidden.device)
    student = student_hidden.flatten(0, -2)

    def chunk_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(head.logits(t), -1)
        log_q = F.log_softmax(head.logits(s), -1)
        return F.kl_div(log_q, log_p, reduction="sum", log_target=True)  # Σ p·(log p − log q)

    return _chunked_sum(chunk_kl, chunk_tokens or logit_chunk_tokens(head.vocab_size), teacher, student) / student.shape[0]


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
        counted = gate_stats(deployed_gates(model, batch), state.token_mask, state.module_params, state.replacement_params)
    sparsity = counted.value(cfg.target_unit)
    penalty = sparsity.new_zeros(()) if fixed_budget else cfg.alpha * (cfg.target - sparsity).abs()
    logged = {**lm_parts, "sparsity_loss": penalty, "sparsity": sparsity, "module_sparsity": stats.module,
              "param_ratio": stats.params, "attn_sparsity": stats.attn, "mlp_sparsity": stats.mlp}
    if cfg.sparsity_of == "argmax":
        logged["sampled_sparsity"] = stats.value(cfg.target_unit)
    parts = dict(zip(logged, torch.stack([v.detach().float().to(lm.device) for v in logged.values()]).tolist()))  # one host sync
    return lm + penalty.to(lm.device), parts  # with a device map the gates sit on the first layer's device

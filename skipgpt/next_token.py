"""Next-token log-likelihoods from a model's final hidden states, a chunk of tokens at a time.

Both the training losses (NLL and KL to a teacher) and perplexity need the next-token
distribution at every position. At a 128k vocabulary the float32 logits of a micro-batch are the
largest tensors of a step (4 × 2,048 tokens: 4.2 GB each, and a KL held about five), so the
model's forward computes no logits at all (:func:`final_hidden_states`) and these functions
project ``chunk_tokens`` tokens at a time onto the vocabulary, in float32; under autograd each
chunk runs under activation checkpointing when there is more than one. Memory then holds one
chunk's (≤ :data:`LOGIT_CHUNK_BYTES` each). Values and gradients equal the unchunked computation
(tests/test_losses.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .errors import SkipGPTError

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

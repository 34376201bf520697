"""The chunked LM losses (skipgpt/next_token.py, used by skipgpt/training/losses.py) against the plain full-logit computation.

The references here are written out in full: the model's own logits (or the output head applied
to the whole [B, T, d] hidden states), upcast, then ``F.cross_entropy`` / a full log-softmax KL.
Values must agree to rtol 1e-5 and gradients to rtol 1e-4, for chunk sizes that divide the token
count and that do not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from skipgpt import attach_routers, router_parameters, set_gate_mode
from skipgpt.config import RouterConfig
from skipgpt.routing.surgery import gate_mode
from skipgpt import next_token
from skipgpt.training.finetune import FinetuneConfig, _base_model_teacher, add_lora
from skipgpt.next_token import IGNORE_INDEX, final_hidden_states, kl_divergence, logit_chunk_tokens, next_token_nll, sequence_nll
from skipgpt.training.losses import lm_loss

B, T = 2, 15
CHUNKS = [1, 7, None]  # 7 divides neither B·(T−1) = 28 nor B·T = 30; None: the default (one chunk here)
# Gemma 2's soft-capping at 30 barely touches a random tiny model's logits: a cap of 0.5 bites.
OVERRIDES = {"gemma2": {"final_logit_softcapping": 0.5}}


def model_of(arch: str, **overrides) -> torch.nn.Module:
    return tiny_model(arch, **{**OVERRIDES.get(arch, {}), **overrides})


def full_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The reference head: every position at once, then the soft-capping where the config has it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return (torch.tanh(logits / cap) * cap if cap is not None else logits).float()


def reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def reference_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    log_p, log_q = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def routed(arch: str, **overrides) -> torch.nn.Module:
    """Routers half-open and noise-free Gumbel gates: every forward takes the same decisions, and
    the router gradients are not zero."""
    model = attach_routers(model_of(arch, **overrides), RouterConfig(init_bias=0.0))
    model.requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    set_gate_mode(model, "gumbel", tau=1.0, noise=0.0)
    return model


def router_grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, router_parameters(model)))


# ---- the head and the hidden states ------------------------------------------------------------


def test_final_hidden_states_give_the_models_own_logits(arch):
    """What the forward hands the output embedding, projected by the reference head, is exactly
    the model's logits (soft-capped for Gemma 2): the captured states are the right ones."""
    model, batch = model_of(arch), random_ids(B, T)
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        assert hidden.shape == (B, T, model.config.hidden_size)
        torch.testing.assert_close(full_logits(model, hidden), model(input_ids=batch).logits, rtol=0, atol=0)


def test_the_forward_computes_no_logits():
    model = model_of("llama")
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    final_hidden_states(model, random_ids(B, T))
    assert seen == [torch.Size([B, 0, model.config.vocab_size])]


def test_default_chunk_bounds_one_chunks_float32_logits():
    assert logit_chunk_tokens(128_256) == 523 and 523 * 128_256 * 4 <= 256 * 2**20 < 524 * 128_256 * 4
    assert logit_chunk_tokens(10**12) == 1  # at least one token
    assert logit_chunk_tokens(128) > B * T  # the tiny models: one chunk


def test_the_chunk_budget_is_a_module_setting(monkeypatch):
    """Setting ``LOGIT_CHUNK_BYTES`` changes the default chunk, and the loss with it stays equal."""
    model, batch = model_of("llama"), random_ids(B, T)
    with torch.no_grad():
        one_chunk = sequence_nll(model, batch)
        monkeypatch.setattr(next_token, "LOGIT_CHUNK_BYTES", 3 * 4 * 128)
        assert logit_chunk_tokens(128) == 3
        seen = []
        model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.shape[0]))
        torch.testing.assert_close(sequence_nll(model, batch), one_chunk, rtol=1e-5, atol=0)
    assert seen[1:] == [3] * 9 + [1]  # B·(T−1) = 28 tokens after the forward's empty call


# ---- values and gradients equal the unchunked computation ---------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_nll_equals_full_cross_entropy(arch, chunk):
    model, batch = model_of(arch), random_ids(B, T)
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        hf_loss = model(input_ids=batch, labels=batch).loss
    hidden.requires_grad_(True)
    ours = next_token_nll(model, hidden, batch, chunk_tokens=chunk)
    reference = reference_nll(full_logits(model, hidden), batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=0)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    (g_ref,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_kl_equals_full_log_softmax_kl(arch, chunk):
    model = model_of(arch)
    with torch.no_grad():
        teacher = final_hidden_states(model, random_ids(B, T, seed=1))
        student = final_hidden_states(model, random_ids(B, T, seed=2))
    student.requires_grad_(True)
    ours = kl_divergence(model, teacher, student, chunk)
    reference = reference_kl(full_logits(model, teacher), full_logits(model, student))
    assert float(reference.detach()) > 1e-3  # two different texts: a real divergence
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["nll", "kl"])
@pytest.mark.parametrize("chunk", [7, None])
def test_router_gradients_equal_the_full_logit_loss(arch, loss, chunk):
    """The whole ``lm_loss`` (teacher pass included) against the model's own full logits."""
    model, batch = routed(arch), random_ids(B, T)
    ours, _ = lm_loss(model, batch, loss, chunk_tokens=chunk)
    g_ours = router_grads(model, ours)
    if loss == "kl":
        with torch.no_grad(), gate_mode(model, "dense"):
            target = model(input_ids=batch).logits.float()
        reference = reference_kl(target, model(input_ids=batch).logits.float())
    else:
        reference = model(input_ids=batch, labels=batch).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    g_ref = router_grads(model, reference)
    assert any(float(g.abs().max()) > 0 for g in g_ref)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_padding_labels_count_for_nothing_as_in_hugging_faces_loss():
    model, batch = model_of("llama"), random_ids(B, T)
    labels = batch.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        hf_loss = model(input_ids=batch, labels=labels).loss
        torch.testing.assert_close(next_token_nll(model, hidden, labels, chunk_tokens=4), hf_loss, rtol=1e-5, atol=0)
        total = next_token_nll(model, hidden, labels, reduction="sum", chunk_tokens=4)
    torch.testing.assert_close(total / int((labels[:, 1:] != IGNORE_INDEX).sum()), hf_loss, rtol=1e-5, atol=0)


def test_sequence_nll_sum_is_the_perplexity_protocols_sum():
    model, batch = model_of("qwen2"), random_ids(3, T)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1].float()
        reference = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        torch.testing.assert_close(sequence_nll(model, batch, reduction="sum", chunk_tokens=5), reference, rtol=1e-5, atol=0)


# ---- through PEFT (stage 2) ----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["nll", "kl"])
def test_stage_2_loss_through_peft_equals_the_full_logit_loss(loss):
    """LoRA on a routed model: the base-model teacher (adapters off, dense) and the student, both
    through ``peft_model(...)``; LoRA B starts at zero, so it is made non-zero first."""
    model = attach_routers(model_of("gemma2"))
    peft_model = add_lora(model, FinetuneConfig(lora_r=2))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    set_gate_mode(model, "argmax")
    batch = random_ids(B, T)
    ours, _ = lm_loss(peft_model, batch, loss, _base_model_teacher(peft_model), chunk_tokens=4)
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    g_ours = torch.autograd.grad(ours, lora)
    student = peft_model(input_ids=batch).logits.float()
    if loss == "kl":
        with torch.no_grad(), peft_model.disable_adapter(), gate_mode(model, "dense"):
            target = peft_model(input_ids=batch).logits.float()
        reference = reference_kl(target, student)
        assert float(reference.detach()) > 1e-4
    else:
        reference = reference_nll(student, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    for a, b in zip(g_ours, torch.autograd.grad(reference, lora), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


# ---- no [B, T, V] tensor -------------------------------------------------------------------------


class LargestOutputs(TorchDispatchMode):
    """Records the element count of every tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[int, tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), tuple(t.shape), t.dtype, str(func)))
        return out


WIDE = dict(vocab_size=1024)
ROWS = 3  # 3·(T−1)·V = 43,008 elements: more than any weight (V·d = 32,768) or activation


def widest_tensor(run) -> tuple[int, tuple[int, ...], torch.dtype, str]:
    with LargestOutputs() as record:
        run()
    return max(record.numels)


@pytest.mark.parametrize("loss", ["nll", "kl"])
def test_chunked_loss_never_creates_a_batch_by_vocabulary_tensor(loss):
    """Every tensor produced in the loss's forward and backward (the model's own forwards
    included) has fewer elements than B·(T−1)·V, in any dtype: the largest is one chunk's logits
    or the output embedding's weight. Checked to fail on the previous losses.py (HF forward with
    full logits, ``.logits.float()``, full log-softmax): there the widest tensor is [3, 15, 1024].
    The reference below, the old computation, is caught too: the detector works."""
    model = routed("llama", **WIDE)
    batch = random_ids(ROWS, T, vocab=WIDE["vocab_size"])
    limit = ROWS * (T - 1) * WIDE["vocab_size"]

    def chunked() -> None:
        total, _ = lm_loss(model, batch, loss, chunk_tokens=4)
        total.backward()

    def unchunked() -> None:
        if loss == "kl":
            with torch.no_grad(), gate_mode(model, "dense"):
                target = model(input_ids=batch).logits.float()
            reference_kl(target, model(input_ids=batch).logits.float()).backward()
        else:
            model(input_ids=batch, labels=batch).loss.backward()

    widest = widest_tensor(chunked)
    assert widest[0] < limit, widest
    assert widest[0] <= max(4 * WIDE["vocab_size"], model.get_output_embeddings().weight.numel())
    assert widest_tensor(unchunked)[0] >= limit

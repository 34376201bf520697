"""Text generation with a routed model: Hugging Face ``generate`` on the skipping path.

The routed model *is* a transformers model, so ``model.generate`` works as usual (KV cache,
sampling, stopping). This wrapper adds what a user of skipgpt wants around it: batched prompts
padded on the left, an optional chat template, a fixed seed for sampling, and the sparsity that
routing achieved over the prompt and the generated tokens (padding excluded). With
``speculative=True`` the routed model only drafts and the same weights verify dense
(:mod:`skipgpt.speculative`): the dense model's output, at the draft's speed where it is right.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch

from ..config import JsonConfig
from ..devices import input_device
from ..errors import SkipGPTError
from ..routing.sparsity import SparsityMeter
from ..routing.surgery import gate_mode, has_routers, measure_sparsity, routing_state
from .speculative import AUTO_START, Sampling, parse_draft_tokens, speculative_decode


ROUTINGS = ("argmax", "masked", "dense")


@dataclass
class GenerateConfig(JsonConfig):
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = False  # wrap each prompt in the tokenizer's chat template (instruct models)
    speculative: bool = False  # the routed model drafts, the dense model (same weights) decides
    draft_tokens: int | str = AUTO_START  # tokens drafted per round, or "auto"
    # How a routed model computes: "argmax" (skip for real, the deployed model), "masked" (every
    # module computed, multiplied by its argmax gate: the reference the skipping path must equal)
    # or "dense" (the routers ignored). Never the model's current gate mode: after training that may
    # be "gumbel", whose random decisions are not the model anyone evaluated.
    routing: Literal["argmax", "masked", "dense"] = "argmax"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise SkipGPTError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")


@dataclass
class Generation:
    texts: list[str]
    new_tokens: int
    seconds: float
    sparsity: dict[str, Any] | None = field(default=None)  # speculative: the draft's
    speculative: dict[str, Any] | None = None  # rounds, acceptance rate, mean accepted length


def _encode(tokenizer: Any, prompts: Sequence[str], chat: bool, device: torch.device) -> dict[str, torch.Tensor]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SkipGPTError("this tokenizer has no chat template; drop --chat")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)


@contextlib.contextmanager
def _routing(model: torch.nn.Module, routing: str) -> Iterator[SparsityMeter | None]:
    """Argmax (or dense) gates and the chosen computation for the block, the model's own settings
    restored after it; the sparsity meter of a routed model (None for a plain one)."""
    if not has_routers(model):
        yield None
        return
    state = routing_state(model)
    saved = state.skip_compute
    state.skip_compute = routing != "masked"
    try:
        with gate_mode(model, "dense" if routing == "dense" else "argmax"), measure_sparsity(model) as meter:
            yield meter
    finally:
        state.skip_compute = saved


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: GenerateConfig | None = None) -> Generation:
    """Complete each prompt; routed models skip for real (argmax routing, KV policy ``keep``)."""
    cfg = cfg or GenerateConfig()
    if not prompts or any(not p for p in prompts):
        raise SkipGPTError("give at least one non-empty prompt")
    if cfg.max_new_tokens < 1:
        raise SkipGPTError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.speculative:
        parse_draft_tokens(cfg.draft_tokens)  # bad input fails before any work
    inputs = _encode(tokenizer, prompts, cfg.chat, input_device(model))
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = inputs["input_ids"].shape[1]
    if context is not None and longest + cfg.max_new_tokens > context:
        raise SkipGPTError(
            f"the longest prompt has {longest} tokens; with {cfg.max_new_tokens} new tokens that exceeds the model's "
            f"context of {context} tokens: shorten the prompt or lower --max-new-tokens"
        )
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) if cfg.do_sample else dict(do_sample=False)
    torch.manual_seed(cfg.seed)
    stats = None
    start = time.perf_counter()
    with torch.no_grad(), _routing(model, cfg.routing) as meter:
        if cfg.speculative:
            out, stats = speculative_decode(
                model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                draft_tokens=cfg.draft_tokens, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id,
                sampling=Sampling(cfg.temperature, cfg.top_p, cfg.top_k) if cfg.do_sample else None)
        else:
            out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[:, inputs["input_ids"].shape[1]:]
    return Generation(
        texts=tokenizer.batch_decode(new, skip_special_tokens=True),
        new_tokens=int((new != tokenizer.pad_token_id).sum()),
        seconds=seconds,
        sparsity=meter.summary() if meter is not None else None,
        speculative=stats.summary() if stats is not None else None,
    )

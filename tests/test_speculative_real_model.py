"""Self-speculative decoding on the real default model, SmolLM2-135M: the dense model's greedy text."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_data_dir

from skipgpt import GenerateConfig, RouterConfig, attach_routers, detach_routers, generate
from skipgpt.training.importance import seed_routers_from_importance

pytestmark = pytest.mark.slow

FALLBACK = ["The capital of France is a city that", "Once upon a time, in a small village by the sea, there lived",
            "The history of the Roman Empire begins with"]


def real_prompts() -> list[str]:
    """Three WikiText-2 test paragraphs, cut to their first 32 words, where the data is at hand."""
    data = shared_data_dir()
    path = data / "wikitext2" / "wiki.test.raw" if data else None
    if path is None or not path.is_file():
        return FALLBACK
    paragraphs = [line.strip() for line in path.read_text().splitlines() if len(line.split()) > 60 and not line.strip().startswith("=")]
    return [" ".join(p.split()[:32]) for p in paragraphs[:3]]


@pytest.fixture(scope="module")
def smollm2():
    from skipgpt.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def test_speculative_greedy_text_is_the_dense_text(smollm2):
    model, tokenizer = smollm2
    prompts = real_prompts()
    lengths = {False: 24, True: 10}  # plain continuation; the chat template path, shorter (test time)
    dense = {chat: generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=n, chat=chat)).texts for chat, n in lengths.items()}
    # The static Block-Influence cut of 15 % of the parameters: a draft that is right part of the time.
    attach_routers(model, RouterConfig())
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".skip_routers." in name and name.endswith("weight"):
                    p.zero_()
        calib = tokenizer(" ".join(prompts), return_tensors="pt").input_ids[:, :64]
        seed_routers_from_importance(model, calib, 0.15, "params")
        for chat, n in lengths.items():  # a left-padded batch of three
            result = generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=n, chat=chat, speculative=True,
                                                                        draft_tokens="auto"))
            assert result.texts == dense[chat]
            assert 0 < result.speculative["acceptance_rate"] < 1
            assert 0.05 < result.sparsity["param_ratio"] < 0.25
    finally:
        detach_routers(model)

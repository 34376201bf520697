"""Self-speculative decoding is lossless: greedy output is the dense model's token for token,
sampled output follows the dense distribution, and both caches roll back to what was accepted."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import ARCHS, save_tiny_model_dir, tiny_model
from conftest import left_padded as padded_batch
from transformers import DynamicCache

import skipgpt.inference.speculative
from skipgpt import DroppedKVCache, RouterConfig, SkipGPTError, attach_routers, detach_routers, routing_state
from skipgpt.cli import main
from skipgpt.routing.kv import DroppedKVLayer
from skipgpt.inference.speculative import AUTO_MAX, Sampling, SpeculativeDecoder, parse_draft_tokens, speculative_decode
from skipgpt.routing.surgery import gate_mode

NO_EOS: list[int] = []  # rows never finish early: caches can be compared with a run over the tokens


def routed(arch: str = "llama", attn: str = "eager", policy: str = "keep", threshold: float = -2.0, **config):
    """Random routers that skip part of the modules: a draft that is often right, not always."""
    attn = "eager" if arch == "gemma2" else attn  # Gemma 2 has no SDPA path
    model = attach_routers(tiny_model(arch, attn=attn), RouterConfig(init_bias=0.0, threshold=threshold, kv_policy=policy, **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".skip_routers." in name and ".net." in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


def left_padded(batch: int = 3, length: int = 12, seed: int = 1):
    return padded_batch(batch, length, seed, pad=4)


def dense_generate(model, ids, mask, new_tokens: int, **kwargs):
    with torch.no_grad(), gate_mode(model, "dense"):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


def dense_generate_plain(model, ids, mask, new_tokens: int):
    """The reference without routers at all."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


# --- greedy: the dense model's tokens ------------------------------------------------------------

@pytest.mark.parametrize("policy", ["keep", "drop"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_is_dense_greedy_generate(arch, attn, policy):
    if arch == "gemma2" and attn == "sdpa":
        pytest.skip("Gemma 2 has no SDPA path")
    model = routed(arch, attn, policy)
    ids, mask = left_padded()  # 12 + 24 tokens: past the sliding windows (16) of Mistral and Gemma
    reference = dense_generate(model, ids, mask, 24)
    accepted = 0
    for k in (1, 4, "auto"):
        out, stats = speculative_decode(model, ids, mask, max_new_tokens=24, draft_tokens=k, pad_token_id=0)
        assert torch.equal(out, reference), f"draft tokens {k}"
        assert stats.accepted < stats.drafted  # rejections happened, so rollback was exercised
        accepted += stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_the_verifier_is_the_plain_model_padding_and_kv_policy_included(policy):
    """Gate mode "dense" runs the model's own code and cache: padding is computed and "drop" keeps keys."""
    model = routed("mistral", "sdpa", policy)
    ids, mask = left_padded()
    with torch.no_grad(), gate_mode(model, "dense"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = dense_generate(model, ids, mask, 8)
    with torch.no_grad():
        detach_routers(model)
        assert torch.equal(logits, model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(tokens, dense_generate_plain(model, ids, mask, 8))


def test_greedy_output_equals_the_model_without_routers_and_ignores_replacements():
    model = routed("llama", "sdpa", replacement="bias")
    with torch.no_grad():
        for layer in model.model.layers:
            for router in layer.skip_routers.values():
                router.replacement.bias.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))  # batch 1, no padding
    out, stats = speculative_decode(model, ids, max_new_tokens=20, draft_tokens=3)
    assert stats.accepted > 0
    assert torch.equal(out, dense_generate_plain(detach_routers(model), ids, None, 20))


def test_eos_pads_finished_rows_and_stops_like_generate():
    model = routed("qwen2", "sdpa")
    ids, mask = left_padded()
    free = dense_generate(model, ids, mask, 16, eos_token_id=NO_EOS)[:, ids.shape[1]:]
    one = [int(free[0, 2])]  # row 0 finishes early, the others go on
    each = [int(free[0, 2]), int(free[1, 4]), int(free[2, 5])]  # every row finishes: generate stops early
    for eos in (one, each):
        reference = dense_generate(model, ids, mask, 16, eos_token_id=eos)
        out, _ = speculative_decode(model, ids, mask, max_new_tokens=16, draft_tokens=4, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, reference)
    assert out.shape[1] < ids.shape[1] + 16


# --- rollback ------------------------------------------------------------------------------------

def prefix_cache(model, ids, mask, length: int, dense: bool):
    """The cache of one forward over the first ``length`` tokens, positions as model.generate's."""
    full = torch.cat([mask, torch.ones(mask.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    drop = routing_state(model).config.kv_policy == "drop" and not dense
    cache = DroppedKVCache() if drop else DynamicCache(config=model.config)
    with torch.no_grad(), gate_mode(model, "dense" if dense else "argmax"):
        model(input_ids=ids[:, :length], attention_mask=full[:, :length], position_ids=positions[:, :length],
              cache=cache, use_cache=True)
    return cache


def assert_same_keys(cache, reference):
    assert cache.get_seq_length() == reference.get_seq_length()
    for layer, ref in zip(cache.layers, reference.layers):
        if isinstance(ref, DroppedKVLayer):  # slots are packed per forward: compare row by row, by position
            for row in range(ref.keys.shape[0]):
                (at, keys, values), (ref_at, ref_keys, ref_values) = _by_position(layer, row), _by_position(ref, row)
                assert torch.equal(at, ref_at)
                assert torch.allclose(keys, ref_keys, atol=1e-5) and torch.allclose(values, ref_values, atol=1e-5)
        else:
            assert torch.allclose(layer.keys, ref.keys, atol=1e-5) and torch.allclose(layer.values, ref.values, atol=1e-5)


def _by_position(layer, row: int):
    valid = layer.valid[row]
    order = layer.positions[row][valid].argsort()
    return layer.positions[row][valid][order], layer.keys[row][:, valid][:, order], layer.values[row][:, valid][:, order]


@pytest.mark.parametrize("arch,policy", [("llama", "keep"), ("mistral", "keep"), ("llama", "drop"), ("gemma3_text", "drop")])
def test_both_caches_roll_back_to_a_run_over_the_committed_tokens(arch, policy):
    model = routed(arch, "sdpa", policy)
    ids, mask = left_padded(length=14)
    decoder = SpeculativeDecoder(model, ids, mask, max_new_tokens=24, draft_tokens=4, eos_token_id=NO_EOS)
    checked = 0
    with torch.no_grad(), gate_mode(model, "argmax"):
        decoder.prefill()
        while not decoder.done:
            committed_drafts = decoder.stats.committed_drafts
            decoder.step()
            if decoder.stats.draft_lengths[-1] == 4 and decoder.stats.committed_drafts - committed_drafts < 4:  # a rejection
                committed = decoder.tokens.shape[1]
                # The dense cache holds every committed token but the last, which the next round feeds.
                assert_same_keys(decoder.dense_cache, prefix_cache(model, decoder.tokens, mask, committed - 1, dense=True))
                draft_length = decoder.draft_cache.get_seq_length()
                assert committed - 3 <= draft_length <= committed - 1  # lags one or two tokens
                assert_same_keys(decoder.draft_cache, prefix_cache(model, decoder.tokens, mask, draft_length, dense=False))
                checked += 1
    assert checked >= 2


def test_dropped_kv_cache_crops_by_position():
    model = routed("llama", "sdpa", "drop", threshold=0.0)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    cache = DroppedKVCache()
    with torch.no_grad():
        model(input_ids=ids[:, :8], cache=cache, use_cache=True)
        for t in range(8, 20):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
    stored = cache.stored_tokens()
    cache.crop(-6)
    assert cache.get_seq_length() == 14
    assert cache.stored_tokens() < stored  # slots no row holds any more are freed
    for layer in cache.layers:
        assert not bool((layer.positions[layer.valid] >= 14).any())
    with pytest.raises(SkipGPTError, match="negative count"):
        cache.crop(3)


# --- sampling: the dense distribution ------------------------------------------------------------

SAMPLING = Sampling(temperature=0.8, top_k=3)
NEW_TOKENS, DRAWS = 4, 4000


def exact_distribution(model, prompt: torch.Tensor) -> dict[tuple[int, ...], float]:
    """P(first NEW_TOKENS tokens) of dense sampling, enumerated: top-3 after temperature, as
    model.generate(do_sample=True, temperature=0.8, top_k=3) draws them."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for t in range(NEW_TOKENS):
        prefixes = list(dist)
        ids = torch.cat([prompt.expand(len(prefixes), -1), torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), t)], dim=1)
        with torch.no_grad(), gate_mode(model, "dense"):
            logits = model(input_ids=ids).logits[:, -1].float() / 0.8
        kth = logits.topk(3, dim=-1).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        dist = {s + (tok,): dist[s] * float(probs[i, tok]) for i, s in enumerate(prefixes) for tok in probs[i].nonzero().flatten().tolist()}
    return dist


def chi_square(counts: Counter, expected: dict[tuple[int, ...], float], draws: int) -> tuple[float, float]:
    """Pearson's statistic over the cells expected at least 5 times (the rest, and anything outside
    the support, pooled into one cell) and its critical value at the 0.1 % level (Wilson–Hilferty)."""
    stat, pooled_expected, pooled_seen, cells = 0.0, 0.0, draws - sum(counts[s] for s in expected), 0
    for seq, p in expected.items():
        if p * draws >= 5:
            stat += (counts[seq] - p * draws) ** 2 / (p * draws)
            cells += 1
        else:
            pooled_expected += p * draws
            pooled_seen += counts[seq]
    stat += (pooled_seen - pooled_expected) ** 2 / max(pooled_expected, 1e-9)
    df = cells  # cells + the pooled one, minus one
    z = 3.0902  # standard normal quantile at 0.999
    return stat, df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def sampled(model, prompt: torch.Tensor, seed: int = 0):
    """DRAWS independent samples as the rows of one batch (rows are independent draws)."""
    out, stats = speculative_decode(model, prompt.expand(DRAWS, -1), max_new_tokens=NEW_TOKENS, draft_tokens=2,
                                    sampling=SAMPLING, seed=seed, eos_token_id=NO_EOS)
    return Counter(map(tuple, out[:, prompt.shape[1]:].tolist())), stats


PROMPT = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("threshold", [0.0, float("-inf")], ids=["skipping draft", "nothing skipped"])
def test_sampling_follows_the_dense_distribution(threshold):
    model = routed("llama", threshold=threshold)
    counts, stats = sampled(model, PROMPT)
    stat, critical = chi_square(counts, exact_distribution(model, PROMPT), DRAWS)
    assert stat < critical
    if threshold == 0.0:  # rejections and their residual draws happen
        assert 0.2 < stats.acceptance_rate < 0.9
    else:  # the draft is the dense model: everything accepted, the bonus token drawn from p
        assert stats.acceptance_rate > 0.999 and stats.committed_drafts == 2
    assert sampled(model, PROMPT)[0] == counts  # the seed fixes the draws


@pytest.mark.parametrize("rule", ["always accept", "resample from p"])
def test_a_wrong_acceptance_rule_fails_the_same_test(rule, monkeypatch):
    if rule == "always accept":
        monkeypatch.setattr(skipgpt.inference.speculative, "_accept", lambda p, q, generator: torch.ones_like(p, dtype=torch.bool))
    else:
        monkeypatch.setattr(skipgpt.inference.speculative, "_residual", lambda p, q: p)
    model = routed("llama", threshold=0.0)
    counts, _ = sampled(model, PROMPT)
    stat, critical = chi_square(counts, exact_distribution(model, PROMPT), DRAWS)
    assert stat > critical


# --- draft length -------------------------------------------------------------------------------

def test_auto_draft_length_grows_when_all_is_accepted_and_shrinks_when_little_is():
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    _, perfect = speculative_decode(routed(threshold=float("-inf")), ids, max_new_tokens=60, draft_tokens="auto", eos_token_id=NO_EOS)
    assert perfect.draft_lengths[:6] == [4, 5, 6, 7, 8, AUTO_MAX]
    _, hopeless = speculative_decode(routed(threshold=float("inf")), ids, max_new_tokens=12, draft_tokens="auto", eos_token_id=NO_EOS)
    assert hopeless.draft_lengths[:4] == [4, 3, 2, 1]


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, "0", "x", 2.5, True, None])
def test_draft_tokens_must_be_positive_or_auto(value):
    with pytest.raises(SkipGPTError, match="positive integer or 'auto'"):
        parse_draft_tokens(value)
    assert parse_draft_tokens("3") == 3 and parse_draft_tokens("auto") == "auto"


def test_speculative_decoding_needs_routers_and_plain_processing():
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(SkipGPTError, match="load routers first"):
        speculative_decode(tiny_model("llama"), ids, max_new_tokens=4)
    model = routed()
    model.generation_config.repetition_penalty = 1.2
    with pytest.raises(SkipGPTError, match="repetition_penalty"):
        speculative_decode(model, ids, max_new_tokens=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    save_tiny_model_dir(root / "model")
    from skipgpt import save_routers
    from skipgpt.models import load_model

    model, _ = load_model(str(root / "model"))
    attach_routers(model, RouterConfig(init_bias=0.0, threshold=-2.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".skip_routers." in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    save_routers(model, root / "routers")
    return root


PROMPTS = ["--prompt", "w1 w5 w9 w2", "--prompt", "w7 w3 w3 w8 w11 w4 w6", "--max-new-tokens", "12"]


@pytest.mark.parametrize("argv,message", [
    (["--speculative", "--draft-tokens", "0"], "draft tokens must be a positive integer or 'auto', got 0"),
    (["--draft-tokens", "4"], "--draft-tokens sets speculative decoding: add --speculative"),
    (["--speculative"], "load routers first"),
])
def test_cli_bad_speculative_input_exits_2_with_one_message(argv, message, model_dir, capsys):
    assert main(["generate", "--model", str(model_dir / "model"), *PROMPTS, *argv]) == 2
    err = capsys.readouterr().err
    assert "skipgpt: error: " in err and message in err and "Traceback" not in err


def test_cli_speculative_generation_prints_the_dense_models_text(model_dir, tmp_path):
    model = ["generate", "--model", str(model_dir / "model"), *PROMPTS]
    assert main([*model, "--json", str(tmp_path / "dense.json")]) == 0
    for k in ("auto", "2"):
        assert main([*model, "--routers", str(model_dir / "routers"), "--speculative", "--draft-tokens", k,
                     "--json", str(tmp_path / "spec.json")]) == 0
        dense, spec = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dense", "spec"))
        assert spec["texts"] == dense["texts"]
        assert 0 < spec["speculative"]["acceptance_rate"] < 1 and spec["speculative"]["mean_accepted_length"] >= 1
        assert 0 < spec["sparsity"]["module_sparsity"] < 1  # the draft's, not the verifier's zero


def test_small_batches_exercise_rejection_at_every_draft_position_and_follow_the_dense_distribution():
    """One batch of DRAWS rows commits the minimum accepted count over all rows, so a rejection past
    the first draft position and its residual draw almost never happen there. Batches of 2 rows
    with their own seeds reach both draft positions (counted), the bonus token, and still sample
    exactly the dense distribution."""
    model = routed("llama", threshold=0.0)
    counts, residual_at, bonus = Counter(), [0, 0], 0
    for seed in range(DRAWS // 2):
        out, stats = speculative_decode(model, PROMPT.expand(2, -1), max_new_tokens=NEW_TOKENS, draft_tokens=2,
                                        sampling=SAMPLING, seed=seed, eos_token_id=NO_EOS)
        counts.update(map(tuple, out[:, PROMPT.shape[1]:].tolist()))
        residual_at = [a + b for a, b in zip(residual_at, stats.residual_at + [0, 0])]
        bonus += stats.bonus
    assert min(residual_at) >= 200 and bonus >= 200, (residual_at, bonus)
    stat, critical = chi_square(counts, exact_distribution(model, PROMPT), DRAWS)
    assert stat < critical

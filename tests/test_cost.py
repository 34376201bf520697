"""The FLOP yardstick behind the benchmark's ideal speedups, and the ceiling ``skipgpt info`` prints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model_dir, tiny_model
from transformers import AutoConfig

from skipgpt.cli import main
from skipgpt.config import RouterConfig
from skipgpt.inference.cost import FlopCount, ModelShape, router_flops, routing_ceiling, routing_parameters
from skipgpt.routing.routers import Router


def test_dense_gates_cost_what_no_routing_costs_and_skipping_costs_less():
    shape = ModelShape.from_config(tiny_model("llama").config)
    assert (shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.layers) == (32, 64, 32, 16, 3)
    context = torch.arange(1, 9).expand(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    dense, ones, skip_all = FlopCount(), FlopCount(), FlopCount()
    dense.add(shape, context, mask, None, logits_tokens=2)
    ones.add(shape, context, mask, torch.ones(6, 2, 8), logits_tokens=2)
    skip_all.add(shape, context, mask, torch.zeros(6, 2, 8), logits_tokens=2)
    assert dense.executed == dense.dense == ones.executed
    # Everything skipped leaves the keys/values (keep policy) and the LM head.
    expected = 3 * 16 * (2 * 2 * 32 * 16) + 2 * 32 * 128 * 2
    assert skip_all.executed == expected and skip_all.ideal_speedup > 1


def test_padding_costs_nothing():
    shape = ModelShape.from_config(tiny_model("llama").config)
    padded, unpadded = FlopCount(), FlopCount()
    mask = torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)
    padded.add(shape, torch.tensor([[0, 0, 1, 2]]), mask, torch.ones(6, 1, 4), 1)
    unpadded.add(shape, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), torch.ones(6, 1, 2), 1)
    assert padded.dense == unpadded.dense and padded.executed == unpadded.executed


def test_drop_policy_saves_keys_values_and_attention_over_skipped_keys():
    shape = ModelShape.from_config(tiny_model("llama").config)
    context = torch.arange(1, 9).expand(1, 8)
    mask = torch.ones(1, 8, dtype=torch.bool)
    gates = (torch.arange(8) % 2 == 0).float().expand(6, 1, 8)  # every other token executes everything
    keep, drop = FlopCount(), FlopCount()
    keep.add(shape, context, mask, gates, 1)
    stored = drop.add(shape, context, mask, gates, 1, kv_policy="drop")
    assert torch.equal(stored, torch.full((3, 1), 4.0, dtype=torch.float64))
    assert drop.dense == keep.dense and drop.executed < keep.executed
    # A second step continues from the stored counts.
    again = drop.add(shape, torch.tensor([[9]]), torch.ones(1, 1, dtype=torch.bool), torch.ones(6, 1, 1), 1,
                     kv_policy="drop", keys_before=stored)
    assert torch.equal(again, stored + 1)


# ---------------------------------------------------------------------------------------------
# Router compute and the ceiling (skipgpt info).

TINY_LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def tiny_config(**overrides):
    return AutoConfig.for_model("llama", **{**TINY_LLAMA, "tie_word_embeddings": False, **overrides})


def test_router_flops_and_parameters_for_linear_and_mlp_routers():
    # linear: d -> 2 is 2·32·2 = 128; mlp: 32 -> 8 -> 2 is 2·(32·8 + 8·2) = 544; the RMS norm 3·32 = 96.
    assert router_flops(32, "linear") == 128 + 96 and router_flops(32, "linear", input_norm=False) == 128
    assert router_flops(32, "mlp") == 544 + 96 and router_flops(32, "mlp", input_norm=False) == 544
    with pytest.raises(ValueError):
        router_flops(32, "conv")
    for kind, replacement, rank in (("linear", "none", 0), ("mlp", "bias", 0), ("linear", "lowrank", 4)):
        config = RouterConfig(router=kind, replacement=replacement, replacement_rank=rank)
        module = Router(32, config)
        own = sum(p.numel() for p in module.net.parameters())
        rep = 0 if module.replacement is None else module.replacement.cost()
        assert routing_parameters(32, config) == (own, rep)


def test_routers_count_in_every_executed_token_and_module_never_in_dense():
    shape = ModelShape.from_config(tiny_model("llama").config)
    context = torch.arange(1, 9).expand(2, 8)
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6], dtype=torch.bool)  # 14 real tokens
    gates = (torch.arange(8) % 3 > 0).float().expand(6, 2, 8)
    for policy in ("keep", "drop"):
        for kind, per_router in (("linear", 224.0), ("mlp", 640.0)):
            plain, routed = FlopCount(), FlopCount()
            plain.add(shape, context, mask, gates, 2, kv_policy=policy)
            routed.add(shape, context, mask, gates, 2, kv_policy=policy, router=router_flops(32, kind))
            assert routed.dense == plain.dense
            assert routed.executed - plain.executed == pytest.approx(per_router * 14 * 6, rel=1e-12)
    # Nothing skipped costs the routers: the ideal speedup falls below 1.
    ones = FlopCount()
    ones.add(shape, context, mask, torch.ones(6, 2, 8), 2, router=router_flops(32, "linear"))
    assert ones.ideal_speedup < 1 and ones.executed - ones.dense == 224 * 14 * 6


def test_ceiling_on_a_tiny_config_by_hand():
    # d 32, MLP 64, q 32, kv 16, vocab 128, 3 layers, untied; 4-token context, fp32 weights.
    c = routing_ceiling(tiny_config(), RouterConfig(replacement="bias"), context=4, bytes_per_param=4)
    # FLOPs a token: K/V 2·2·32·16 = 2048, Q/O 2·2·32·32 = 4096, core 2·2·32 = 128 a key,
    # MLP 2·3·32·64 = 12288, LM head 2·32·128 = 8192 a position, a router 2·32·2 + 3·32 = 224 (6 a token),
    # a bias replacement 32.
    # Prefill: 4 tokens seeing 1..4 keys (10 in all), logits at the last one.
    attention = 3 * (4 * (2048 + 4096) + 128 * 10)
    assert attention == 77568
    assert c.parts["prefill"] == {"attention": 77568 / 4, "mlp": 3 * 4 * 12288 / 4, "embeddings": 0.0,
                                  "lm_head": 8192 / 4, "routers": 224 * 6}
    assert c.skippable["prefill"] == (3 * (4 * 4096 + 1280) + 3 * 4 * 12288) / 4  # K/V stay under keep
    plain = 77568 + 147456 + 8192
    executed = 3 * 4 * 2048 + 0.75 * 200448 + 8192 + 224 * 6 * 4 + 32 * 6 * 4 * 0.25
    assert c.speedup["prefill"]["0.25"] == pytest.approx(plain / executed, rel=1e-12)
    assert c.speedup["prefill"]["0.4"] == pytest.approx(plain / (24576 + 0.6 * 200448 + 8192 + 5376 + 32 * 6 * 4 * 0.4),
                                                        rel=1e-12)
    assert c.speedup["score"]["0.25"] == pytest.approx((plain + 3 * 8192) / (executed + 3 * 8192), rel=1e-12)
    assert c.routable_share("prefill") == pytest.approx((77568 + 147456) / (plain + 5376), rel=1e-12)
    # One decoding step seeing 4 keys.
    assert c.parts["decode"]["attention"] == 3 * (6144 + 512) and c.total("decode") == 65024 + 1344
    assert c.speedup["decode"]["0.25"] == pytest.approx(65024 / (6144 + 0.75 * 50688 + 8192 + 1344 + 48), rel=1e-12)
    # Bytes a batch-1 decoding step reads: K/V weights 1024, Q/O 2048, MLP 6144, KV cache 2·16·4 = 128 a layer,
    # LM head 4096 values, × 4 bytes; routers 6·66 float32 parameters; a skipped module's bias 32.
    assert c.parts["decode_bytes"] == {"attention": 3 * (1024 + 2048 + 128) * 4, "mlp": 3 * 6144 * 4,
                                       "embeddings": 0.0, "lm_head": 4096 * 4, "routers": 6 * 66 * 4}
    assert c.skippable["decode_bytes"] == 3 * (2048 + 6144 + 128) * 4
    read = (3 * (1024 + 0.75 * (2048 + 6144 + 128)) + 4096) * 4 + 6 * 66 * 4 + 0.25 * 6 * 32 * 4
    assert c.speedup["decode_bytes"]["0.25"] == pytest.approx(128512 / read, rel=1e-12)
    # Weights stored: routers and their bias replacements in float32.
    assert c.parts["weight_bytes"] == {"attention": 3 * 3072 * 4, "mlp": 3 * 6144 * 4, "embeddings": 4096 * 4,
                                       "lm_head": 4096 * 4, "routers": 6 * (66 + 32) * 4}
    assert c.skippable_share("weight_bytes") == pytest.approx(98304 / 145712, rel=1e-12)
    assert json.loads(json.dumps(c.to_dict()))["speedup"]["decode_bytes"]["0.25"] == pytest.approx(128512 / read)


def test_drop_policy_ceiling_skips_keys_values_too():
    keep = routing_ceiling(tiny_config(), RouterConfig(replacement="none"), context=4)
    drop = routing_ceiling(tiny_config(), RouterConfig(replacement="none", kv_policy="drop"), context=4)
    assert drop.skippable_share("decode") == drop.routable_share("decode") > keep.skippable_share("decode")
    # Decoding: a query executes 3/4 of the time and sees the 3/4 of the 4 keys stored.
    executed = 0.75 * 3 * (6144 + 12288 + 128 * 4 * 0.75) + 8192 + 1344
    assert drop.speedup["decode"]["0.25"] == pytest.approx(65024 / executed, rel=1e-12)
    assert drop.speedup["decode_bytes"]["0.25"] > keep.speedup["decode_bytes"]["0.25"]


def test_tied_embeddings_are_stored_once_but_the_head_still_costs_compute():
    untied = routing_ceiling(tiny_config(), context=64)
    tied = routing_ceiling(tiny_config(tie_word_embeddings=True), context=64)
    assert not untied.tied_embeddings and tied.tied_embeddings
    assert tied.parts["weight_bytes"]["lm_head"] == 0.0 and untied.parts["weight_bytes"]["lm_head"] == 128 * 32 * 4
    assert untied.total("weight_bytes") - tied.total("weight_bytes") == 128 * 32 * 4
    assert tied.skippable_share("weight_bytes") > untied.skippable_share("weight_bytes")
    for column in ("prefill", "score", "decode", "decode_bytes"):  # the head's matmul and its read remain
        assert tied.parts[column] == untied.parts[column] and tied.parts[column]["lm_head"] > 0
        assert tied.speedup[column] == untied.speedup[column]


def test_warning_for_a_model_whose_embeddings_dominate():
    big_vocab = routing_ceiling(tiny_config(vocab_size=50_000))
    line = big_vocab.warning()
    # Logits at every position make scoring the column the LM head dominates most.
    compute = big_vocab.skippable_share("score")
    assert compute < min(big_vocab.skippable_share(c) for c in ("prefill", "decode")) and compute < 0.6
    assert line is not None
    assert line.startswith(f"warning: routing can skip at most {100 * compute:.0f} % of this model's compute (scoring)")
    assert (f"the ideal speedup at 25 % is {big_vocab.speedup['score']['0.25']:.2f} × (scoring), "
            f"{big_vocab.speedup['decode_bytes']['0.25']:.2f} × (batch-1 decoding)") in line
    decoder_heavy = routing_ceiling(tiny_config(hidden_size=128, intermediate_size=512, head_dim=32))
    assert decoder_heavy.warning() is None
    assert decoder_heavy.warning(limit=0.95) is not None  # the limit is what decides


@pytest.mark.parametrize("vocab, warned", [(50_000, True), (128, False)])
def test_info_prints_the_ceiling_and_warns_only_when_embeddings_dominate(tmp_path, capsys, vocab, warned):
    path = save_tiny_model_dir(tmp_path / "m", vocab_size=vocab, hidden_size=128, intermediate_size=512, head_dim=32)
    assert main(["info", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ideal speedup, 25 % skipped" in out and "routable (attention + MLP)" in out
    assert ("warning: routing can skip at most" in out) == warned

"""The memory plan of benchmarks/scale.py keeps its books right on a tiny shape: weight bytes,
KV-cache bytes, the per-GPU split, and the activation formula against what autograd keeps."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from conftest import REPO
from transformers import DynamicCache

import skipgpt.next_token as next_token
from skipgpt import RouterConfig, attach_routers, router_parameters, routing_state

sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402

# The formulas matched saved-tensor hooks within 0.2 % on every shape, dtype and replacement kind
# tried (tiny and a 2-layer Llama-3.2-1B, bf16 and fp32, replacements none / bias / low rank, one
# logit chunk and several). One d-wide bf16 tensor per module more or less moves the tiny shape's
# total by about 6 %, so 3 % catches a tensor the formulas miss (or one the code stops keeping)
# while leaving room for a few bytes of gate bookkeeping changing between torch versions.
ACTIVATION_TOLERANCE = 0.03
GB = 10**9


def meta_model(layers: int | None = None) -> torch.nn.Module:
    model = scale.build_model(scale.model_config("tiny", layers), "meta", torch.bfloat16)
    attach_routers(model, RouterConfig())
    return model


def test_weight_bytes_are_the_real_models_parameter_and_buffer_bytes():
    real = scale.build_model(scale.model_config("tiny"), "cpu", torch.bfloat16)
    attach_routers(real, RouterConfig())
    expected = scale.tensor_bytes(real.parameters()) + scale.tensor_bytes(real.buffers())
    for gpus in (1, 2):
        placement = scale.place(meta_model(), gpus, GB)
        assert sum(s.weight_bytes for s in placement.shares) == expected
    router_params = sum(p.numel() for p in router_parameters(real))
    assert sum(s.router_params for s in scale.place(meta_model(), 2, GB).shares) == router_params


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_cache_bytes_equal_a_real_dynamic_cache(dtype):
    config = scale.model_config("tiny")
    model = scale.build_model(config, "cpu", dtype)
    batch, seq = 3, 17
    cache = DynamicCache(config=config)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.2x
    with torch.no_grad():
        model(input_ids=scale.random_ids(config.vocab_size, batch, seq), use_cache=True, **{cache_kw: cache})
    measured = sum(scale.tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    d = scale.Dims.of(config, RouterConfig())
    assert scale.kv_cache_bytes(d, batch, seq, dtype.itemsize) == measured


@pytest.mark.parametrize("gpus", [2, 4])
def test_every_layer_sits_on_exactly_one_gpu_and_the_split_sums_to_the_total(gpus):
    model = meta_model(layers=12)
    total = scale.tensor_bytes(model.parameters()) + scale.tensor_bytes(model.buffers())
    placement = scale.place(model, gpus, GB)
    layers = sorted(i for s in placement.shares for i in s.layers)
    assert layers == list(range(12))
    assert sum(s.weight_bytes for s in placement.shares) == total
    assert not placement.offloaded
    assert all(s.layers for s in placement.shares)  # balanced: spread, not piled on GPU 0
    assert placement.embeddings == 0
    assert placement.head == placement.embeddings  # tied to the embeddings (as Llama 3.2 1B's), so kept with them


def test_what_fits_nowhere_is_reported_offloaded_and_fits_no_phase():
    model = meta_model(layers=12)
    per_layer = scale.tensor_bytes(model.model.layers[0].parameters())
    placement = scale.place(model, 1, 4 * per_layer)
    assert placement.offloaded
    assert sum(len(s.layers) for s in placement.shares) < 12


def test_the_largest_batch_is_the_last_that_fits():
    model = meta_model(layers=4)
    d = scale.Dims.of(model.config, routing_state(model).config)
    w = scale.Workload(seq=256)
    placement = scale.place(model, 2, GB)
    limit = 200 * 2**20
    best = scale.largest_batch(d, placement, w, limit, checkpointing=False)
    assert best >= 1
    peak = lambda batch: max(scale.gpu_memory(d, s, w, batch, False).tune_peak for s in placement.shares)  # noqa: E731
    assert peak(best) <= limit < peak(best + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_tokens", [None, 32])  # one logit chunk (nothing recomputed), or several (checkpointed)
def test_the_activation_estimate_matches_the_saved_tensor_bytes(monkeypatch, dtype, chunk_tokens):
    if chunk_tokens:
        monkeypatch.setattr(next_token, "LOGIT_CHUNK_BYTES", chunk_tokens * 4 * scale.SHAPES["tiny"]["vocab_size"])
    check = scale.activation_check("tiny", dtype, batch=2, seq=64, layers=3)
    assert abs(check["ratio"] - 1) < ACTIVATION_TOLERANCE, check


def test_modes_default_by_shape():
    assert scale.parse_args([]).mode == "plan" and scale.parse_args([]).shape == list(scale.PLAN_SHAPES)
    assert scale.parse_args(["--shape", "tiny"]).mode == "run"
    assert scale.parse_args(["--shape", "llama-3.1-8b"]).mode == "plan"
    assert scale.parse_args(["--speed", "--shape", "llama-3.1-8b"]).mode == "speed"

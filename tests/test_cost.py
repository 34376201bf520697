"""The FLOP yardstick behind the benchmark's ideal speedups."""

from __future__ import annotations

import torch
from conftest import tiny_model

from skipgpt.inference.cost import FlopCount, ModelShape


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

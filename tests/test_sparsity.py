"""Sparsity as the paper defines it: over real tokens only, in module and in parameter units."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import random_ids, tiny_model

from skipgpt import RouterConfig, attach_routers, measure_sparsity, routing_state, set_gate_mode
from skipgpt.routing.sparsity import SparsityMeter, gate_stats
from skipgpt.training.tune import tau_at

# ---- gate_stats / SparsityMeter on hand-made tensors -------------------------------------------
# Two layers -> modules [attn0, mlp0, attn1, mlp1] weighing [1, 3, 1, 3]; one sequence of 2 tokens.
WEIGHTS = torch.tensor([1.0, 3.0, 1.0, 3.0])
GATES = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])[:, None, :]  # [M, B=1, T=2]

# mask -> (module, params, attn, mlp, tokens). Skipped per module: [1, 2, 0, 1] over both tokens,
# [0, 1, 0, 0] over the first token only.
STATS_CASES = {
    "no mask": (None, 4 / 8, (1 + 6 + 0 + 3) / (2 * 8), 1 / 4, 3 / 4, 2),
    "all real": (torch.tensor([[1, 1]]), 4 / 8, 10 / 16, 1 / 4, 3 / 4, 2),
    "second token is padding": (torch.tensor([[1, 0]]), 1 / 4, 3 / 8, 0.0, 1 / 2, 1),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_gate_stats_by_hand(case):
    mask, module, params, attn, mlp, tokens = STATS_CASES[case]
    stats = gate_stats(GATES, mask, WEIGHTS)
    assert stats.tokens == tokens
    assert [float(stats.module), float(stats.params), float(stats.attn), float(stats.mlp)] == pytest.approx(
        [module, params, attn, mlp], abs=1e-7
    )
    assert stats.value("modules") is stats.module and stats.value("params") is stats.params


def test_gate_stats_gradient_is_minus_weight_share_on_real_tokens():
    gates = GATES.clone().requires_grad_(True)
    gate_stats(gates, torch.tensor([[1, 0]]), WEIGHTS).params.backward()
    expected = torch.zeros_like(GATES)
    expected[:, 0, 0] = -WEIGHTS / (1 * WEIGHTS.sum())  # d ratio / d gate, one real token
    torch.testing.assert_close(gates.grad, expected)


def test_sparsity_meter_accumulates_over_forwards():
    meter = SparsityMeter(WEIGHTS)
    meter.update(GATES, None)  # skipped [1, 2, 0, 1], 2 tokens
    meter.update(torch.ones(4, 1, 3), None)  # 3 tokens, nothing skipped
    meter.update(torch.zeros(4, 1, 2), torch.tensor([[0, 0]]))  # padding only: no effect
    summary = meter.summary()
    assert summary["tokens"] == 5
    assert summary["module_sparsity"] == pytest.approx(4 / 20)
    assert summary["param_ratio"] == pytest.approx(10 / 40)
    assert summary["attn_sparsity"] == pytest.approx(1 / 10)
    assert summary["mlp_sparsity"] == pytest.approx(3 / 10)
    assert summary["per_layer"] == [
        {"layer": 0, "attn_skip": pytest.approx(0.2), "mlp_skip": pytest.approx(0.4)},
        {"layer": 1, "attn_skip": pytest.approx(0.0), "mlp_skip": pytest.approx(0.2)},
    ]


def test_empty_meter_reports_zero_not_nan():
    summary = SparsityMeter(WEIGHTS).summary()
    assert summary["tokens"] == 0 and summary["module_sparsity"] == 0.0 and summary["param_ratio"] == 0.0


# ---- the same statistics out of a routed model, with padding ------------------------------------

# Batch of 2 x 4: row 0 is left-padded by 2. Six real tokens, 3 layers (modules a0 m0 a1 m1 a2 m2).
MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])


def hand_pattern() -> torch.Tensor:
    """Padding skips everything (must not count); row 0's real tokens skip every attention;
    row 1 skips only layer 2's MLP."""
    gates = torch.ones(6, 2, 4)
    gates[:, 0, :2] = 0.0
    gates[0::2, 0, 2:] = 0.0
    gates[5, 1, :] = 0.0
    return gates


@pytest.mark.parametrize("replacement", ["none", "lowrank"])
def test_fixed_pattern_with_padding_matches_hand_count(arch, replacement):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(replacement=replacement))
    set_gate_mode(model, "fixed", gates=hand_pattern())
    ids = random_ids(2, 4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=MASK)
    stats = routing_state(model).last_stats()
    attn_p, mlp_p = routing_state(model).module_params[:2].tolist()
    attn_r, mlp_r = routing_state(model).replacement_params[:2].tolist()  # what a skip still runs
    # Skipped (token, module) pairs: 2 tokens x 3 attentions + 4 tokens x 1 MLP, out of 6 x 6.
    assert stats.tokens == 6
    assert float(stats.module) == pytest.approx(float(Fraction(10, 36)))
    assert float(stats.attn) == pytest.approx(float(Fraction(6, 18)))
    assert float(stats.mlp) == pytest.approx(float(Fraction(4, 18)))
    routers = float(routing_state(model).router_params.sum())  # every token runs every router: 3 layers x (2d + 2) x 2
    assert routers == 3 * 2 * (2 * 32 + 2)
    assert float(stats.params) == pytest.approx((6 * (attn_p - attn_r) + 4 * (mlp_p - mlp_r)) / (6 * 3 * (attn_p + mlp_p))
                                                - routers / (3 * (attn_p + mlp_p)))
    assert (attn_r, mlp_r) == ((0.0, 0.0) if replacement == "none" else (32 + 2 * 32 * 16,) * 2)


def test_without_a_mask_every_position_counts():
    model = attach_routers(tiny_model("llama"))
    set_gate_mode(model, "fixed", gates=hand_pattern())
    with torch.no_grad():
        model(input_ids=random_ids(2, 4))
    stats = routing_state(model).last_stats()
    assert stats.tokens == 8
    assert float(stats.module) == pytest.approx((2 * 6 + 10) / 48)  # the padding's 12 skips count now


def test_argmax_stats_count_only_real_tokens_of_a_left_padded_batch(arch):
    model = attach_routers(tiny_model(arch), RouterConfig(init_bias=0.0))
    ids = random_ids(2, 4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=MASK)
    state = routing_state(model)
    stats = state.last_stats()
    gates = state.stacked_gates()
    real = MASK.bool()
    assert stats.tokens == 6
    assert float(stats.module) == pytest.approx(float((1 - gates[:, real]).mean()))


def test_measure_sparsity_sums_forwards_and_padding_is_ignored():
    model = attach_routers(tiny_model("llama"))
    set_gate_mode(model, "fixed", gates=hand_pattern())
    with torch.no_grad(), measure_sparsity(model) as meter:
        model(input_ids=random_ids(2, 4), attention_mask=MASK)
        model(input_ids=random_ids(2, 4), attention_mask=MASK)
    assert routing_state(model).meter is None
    summary = meter.summary()
    assert summary["tokens"] == 12
    assert summary["module_sparsity"] == pytest.approx(10 / 36)
    assert [layer["mlp_skip"] for layer in summary["per_layer"]] == pytest.approx([0, 0, 4 / 6])


# ---- Gumbel temperature schedule -----------------------------------------------------------------

TAU_CASES = [  # (step, steps, expected)
    (0, 10, 5.0),
    (9, 10, 1.0),
    (3, 10, 5.0 - 4.0 * 3 / 9),
    (0, 1, 5.0),  # a one-step run uses the start temperature
    (50, 101, 3.0),
]


@pytest.mark.parametrize("step,steps,expected", TAU_CASES)
def test_tau_schedule(step, steps, expected):
    assert tau_at(step, steps, 5.0, 1.0) == pytest.approx(expected)


def test_a_late_anneal_holds_the_start_value_then_reaches_the_end_at_the_last_step():
    values = [tau_at(s, 11, 1.0, 0.0, begin=0.6) for s in range(11)]
    assert values[:7] == [1.0] * 7  # steps 0..6 are within the first 60 % of the run
    assert values[7:] == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_tau_schedule_is_linear():
    taus = torch.tensor([tau_at(s, 20, 5.0, 1.0) for s in range(20)])
    torch.testing.assert_close(taus.diff(), torch.full((19,), -4.0 / 19, dtype=taus.dtype))


@pytest.mark.parametrize("router, per_module", [("linear", 2 * 32 + 2), ("mlp", 32 * 8 + 8 + 8 * 2 + 2)])
def test_the_routers_own_parameters_count_against_the_ratio(router, per_module):
    """Nothing skipped is not free: every token runs every router, so the ratio is minus their share."""
    model = attach_routers(tiny_model("llama"), RouterConfig(router=router))
    state = routing_state(model)
    assert state.router_params.tolist() == [per_module] * 6
    set_gate_mode(model, "fixed", gates=torch.ones(6))
    with torch.no_grad(), measure_sparsity(model) as meter:
        model(input_ids=random_ids(2, 5))
    share = 6 * per_module / float(state.module_params.sum())
    assert state.router_share == pytest.approx(share)
    assert meter.summary()["param_ratio"] == pytest.approx(-share) and float(state.last_stats().params) == pytest.approx(-share)

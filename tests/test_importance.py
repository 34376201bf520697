"""Block Influence per module and router seeding from it."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from skipgpt import RouterConfig, attach_routers, gate_mode, routing_state, set_gate_mode
from skipgpt.training.importance import module_importance, seed_routers_from_importance, static_skip_set

CUTS = {
    # importance, weights, target -> expected skipped modules
    "equal weights": ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 1], 0.5, {1, 3}),
    "stop before overshooting": ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 5], 0.2, {1}),
    "take the closer one": ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 1.5], 0.4, {1, 3}),
    "zero target": ([0.5, 0.1], [1, 1], 0.0, set()),
}


@pytest.mark.parametrize("case", list(CUTS))
def test_static_skip_set(case):
    importance, weights, target, expected = CUTS[case]
    skip = static_skip_set(torch.tensor(importance), torch.tensor(weights, dtype=torch.float64), target)
    assert set(skip.nonzero().flatten().tolist()) == expected


def test_module_importance_is_one_minus_mean_cosine_of_the_layer_stream():
    model = attach_routers(tiny_model("llama"))
    ids = random_ids(2, 12)
    bi = module_importance(model, ids, batch_size=2)
    # Attention of layer 0 maps hidden_states[0] to the stream between the two branches:
    # recompute it by skipping only the layer-0 MLP and reading the layer output.
    gates = torch.ones(6)
    gates[1] = 0.0
    with torch.no_grad(), gate_mode(model, "fixed", gates=gates):
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = 1 - torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1).mean()
    assert float(bi[0]) == pytest.approx(float(expected), abs=1e-5)
    assert bi.shape == (6,) and bool((bi > 0).all())


def test_seeded_routers_start_as_the_static_cut():
    model = attach_routers(tiny_model("llama"), RouterConfig(init="importance", init_bias=50.0))
    ids = random_ids(4, 16)
    info = seed_routers_from_importance(model, ids, 0.3, "modules")
    skip = torch.zeros(6, dtype=torch.bool)
    skip[info["seed_skip"]] = True
    assert int(skip.sum()) == 2  # 0.3 of 6 modules, rounded to the closer count
    with torch.no_grad():
        set_gate_mode(model, "argmax")
        routed = model(input_ids=ids).logits
        assert torch.equal(routing_state(model).stacked_gates().bool().all(-1).all(-1), ~skip)
        set_gate_mode(model, "fixed", gates=(~skip).float())
        assert torch.equal(model(input_ids=ids).logits, routed)


def test_tune_with_importance_init_records_the_seed(tmp_path):
    from skipgpt.config import TuneConfig
    from skipgpt.training.tune import tune_routers

    model = tiny_model("llama")
    cfg = TuneConfig(target=0.3, steps=2, batch_size=2, seq_len=16, save_every=2)
    results = tune_routers(model, random_ids(8, 16), cfg, tmp_path, router_config=RouterConfig(init="importance"),
                           calib_ids=random_ids(2, 32, seed=1), progress=False)
    assert results["router"]["init"] == "importance"
    assert len(results["importance_seed"]["importance"]) == 6 and results["importance_seed"]["seed_skip"]

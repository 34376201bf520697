"""The engine's choice between gathering the executing tokens and the dense path (routing/paths.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.routing import paths
from skipgpt.routing.adapters import get_adapter
from skipgpt.routing.paths import CACHE_NAME, PathCosts, measure_path_costs


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "_MEASURED", {})  # nothing measured or read earlier in this process


def routed(threshold: float = 0.0):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0, threshold=threshold))
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0, generator=torch.Generator().manual_seed(0))
    return model


def test_choice_follows_the_crossover_of_the_grid_point_at_or_below():
    costs = PathCosts("k", {"mlp": [(1, 0.0), (8, 0.0), (64, 0.5), (512, 0.875)]})
    assert costs.choose("mlp", 3, 8) == "dense"  # weight-bound: gathering never paid
    assert costs.choose("mlp", 50, 100) == "gather" and costs.choose("mlp", 51, 100) == "dense"  # the 64 point
    assert costs.choose("mlp", 800, 1000) == "gather"  # the 512 point
    assert costs.choose("mlp", 1, 4096) == "gather"
    assert costs.choose("attn", 1, 8) == paths.DEFAULT_PATH  # nothing measured for this kind
    assert [costs.choose("mlp", 40, 100) for _ in range(5)] == ["gather"] * 5


def test_the_dense_path_runs_the_module_on_every_token_and_gather_on_the_executing():
    model = routed()
    layer = model.model.layers[1]
    seen = []
    layer.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    state = routing_state(model)
    out = {}
    for path in ("gather", "dense"):
        state.engine_path = path
        seen.clear()
        with torch.no_grad():
            out[path] = model(input_ids=ids).logits
        executing = int(state.stacked_gates()[3].sum())
        assert 0 < executing < 40
        assert seen == [executing if path == "gather" else 40]
    torch.testing.assert_close(out["gather"], out["dense"], atol=1e-5, rtol=1e-4)


def test_auto_measures_once_caches_and_reuses(monkeypatch, tmp_path):
    model = routed()
    state = routing_state(model)
    calls = []
    original = paths._timed
    monkeypatch.setattr(paths, "_timed", lambda run, device, *flush: calls.append(1) or original(run, device, *flush))
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        measured = len(calls)
        model(input_ids=ids)
    assert measured > 0 and len(calls) == measured  # one measurement per device and model
    cache = json.loads((tmp_path / "cache" / CACHE_NAME).read_text())
    (entry,) = cache.values()
    assert set(entry) == {"mlp", "attn"} and [n for n, _ in entry["mlp"]] == list(paths.GRID)
    again = measure_path_costs(model.model.layers[0], get_adapter(model), torch.device("cpu"))
    assert len(calls) == measured  # a second model of the same shapes in this process reuses it
    paths._MEASURED.clear()
    again = measure_path_costs(model.model.layers[0], get_adapter(model), torch.device("cpu"))
    assert len(calls) == measured  # and another process reads the file
    assert again.crossover == {k: [tuple(p) for p in v] for k, v in entry.items()}


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"KEY": {"mlp": 3}}'])
def test_a_corrupt_cache_is_measured_again_without_an_error(tmp_path, damage):
    model = routed()
    layer, adapter = model.model.layers[0], get_adapter(model)
    key = paths.cost_key(layer, adapter, torch.device("cpu"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_NAME).write_text(damage.replace("KEY", key.replace('"', '\\"')))
    costs = measure_path_costs(layer, adapter, torch.device("cpu"), max_tokens=8)
    assert [n for n, _ in costs.crossover["mlp"]] == [1, 2, 4, 8]
    assert json.loads((tmp_path / "cache" / CACHE_NAME).read_text())[key] == {k: [list(p) for p in v] for k, v in costs.crossover.items()}


def test_an_offloaded_layer_takes_the_default_path_without_measuring(monkeypatch):
    model = routed()
    state = routing_state(model)
    monkeypatch.setattr("skipgpt.routing.state.measure_path_costs", lambda *a, **k: pytest.fail("measured an offloaded layer"))
    layer = model.model.layers[0]
    meta = layer.to("meta")
    assert state.path(meta, "mlp", 3, 8, torch.device("cpu")) == paths.DEFAULT_PATH


def test_a_wrong_forced_path_is_refused():
    from skipgpt.errors import SkipGPTError

    model = routed()
    routing_state(model).engine_path = "fast"
    with pytest.raises(SkipGPTError, match="engine_path must be one of"):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 128, (2, 20)))

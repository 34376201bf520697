"""Router sets shipped inside the package for the builtin model: named like the model, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from skipgpt import SkipGPTError, load_routers, routing_state
from skipgpt.routing.save_load import BUILTIN_DIR, BUILTIN_ROUTERS, CONFIG_NAME, WEIGHTS_NAME, read_router_config, router_dir


@pytest.mark.parametrize("name", list(BUILTIN_ROUTERS))
def test_builtin_names_resolve_to_files_shipped_in_the_package(name):
    directory = router_dir(name)
    assert (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()
    config = read_router_config(name)
    assert config["router"]["model_type"] == "llama" and config["router"]["num_layers"] == 30
    assert config["router"]["base_model"] == "smollm2-135m"  # the builtin name, not a path of the machine that tuned it
    assert config["command"].startswith("skipgpt tune ")  # how it was made, to reproduce it
    target = config["training"]["target"]
    assert abs(target - int(name[-2:]) / 100) < 0.05


def test_a_directory_of_that_name_wins_over_the_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert router_dir("smollm2-135m-rt25") == BUILTIN_DIR / "smollm2-135m-rt25"
    (tmp_path / "smollm2-135m-rt25").mkdir()
    assert router_dir("smollm2-135m-rt25") == Path("smollm2-135m-rt25")


@pytest.mark.parametrize("name", list(BUILTIN_ROUTERS))
def test_builtin_sets_refuse_another_base_model(name):
    with pytest.raises(SkipGPTError, match="tuned on the builtin model 'smollm2-135m'.*--model smollm2-135m"):
        load_routers(tiny_model("llama"), name)


def test_unknown_router_names_list_the_builtin_sets():
    with pytest.raises(SkipGPTError, match="smollm2-135m-rt25, smollm2-135m-rt40"):
        read_router_config("smollm2-135m-rt99")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILTIN_ROUTERS))
def test_builtin_sets_load_onto_the_builtin_model_and_skip(name):
    from skipgpt.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    load_routers(model, name)
    ids = tokenizer("The history of the city begins in the Roman period, when a small fort was built on the river.",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
    stats = routing_state(model).last_stats()
    assert 0.05 < float(stats.params) < 0.8  # it skips, and not everything
    assert json.loads((router_dir(name) / CONFIG_NAME).read_text())["router"]["base_model"]


# The shipped sets on the first 4 windows of 1,024 WikiText-2 test tokens (4,092 scored), float32 on
# a CPU, as docs/small-budget.md lists them ("The shipped sets on a fixed slice"): perplexity, and
# the parameter ratio skipped. A changed engine, loss, threshold or router file moves them.
SHIPPED_SLICE = {"smollm2-135m-rt25": (44.759, 0.2652), "smollm2-135m-rt40": (92.637, 0.4382)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED_SLICE))
def test_shipped_sets_score_their_documented_numbers_on_a_fixed_wikitext2_slice(name):
    from conftest import shared_data_dir

    from skipgpt.data import load_source
    from skipgpt.evaluation.perplexity import perplexity
    from skipgpt.models import load_model

    if shared_data_dir() is None:
        pytest.skip("no shared data directory ($SKIPGPT_DATA_DIR or ../shared/data)")
    model, tokenizer = load_model("smollm2-135m")
    load_routers(model, name)
    text = load_source("wikitext2", "test", str(shared_data_dir())).text()
    result = perplexity(model, tokenizer, text, seq_len=1024, max_windows=4, progress=False)
    ppl, ratio = SHIPPED_SLICE[name]
    assert result["scored_tokens"] == 4092
    assert result["ppl"] == pytest.approx(ppl, rel=2e-3)  # float32 kernels differ by machine far less than this
    assert result["sparsity"]["param_ratio"] == pytest.approx(ratio, abs=2e-3)  # a flip of ~0.2 % of decisions

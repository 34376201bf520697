"""Router sets and pruning plans know the base model they were made on: by name, and by a
fingerprint of its weights that tells a same-shape fine-tune or sibling apart."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import save_tiny_model_dir, tiny_model, write_word_text

from skipgpt import RouterConfig, SkipGPTError, attach_routers, load_routers, save_routers
from skipgpt.cli import main
from skipgpt.identity import weights_fingerprint
from skipgpt.models import _source_of, load_model


def test_the_fingerprint_is_the_checkpoints_whatever_the_dtype_and_changes_with_the_weights(tmp_path):
    model = tiny_model("llama")
    print_ = weights_fingerprint(model)
    assert weights_fingerprint(tiny_model("llama").to(torch.bfloat16)) == print_  # same checkpoint, bf16
    assert weights_fingerprint(tiny_model("llama", seed=1)) != print_  # a sibling of the same shape
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 0.1  # a fine-tune's change
    assert weights_fingerprint(model) != print_
    assert weights_fingerprint(attach_routers(tiny_model("llama"), RouterConfig())) == print_  # routers are not the base


def test_routers_on_other_weights_of_the_same_shape_warn_and_strict_refuses(tmp_path):
    save_routers(attach_routers(tiny_model("llama"), RouterConfig()), tmp_path / "routers")
    recorded = json.loads((tmp_path / "routers" / "router_config.json").read_text())["router"]
    assert recorded["base_fingerprint"] == weights_fingerprint(tiny_model("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base it was tuned on, in bf16: no warning
        load_routers(tiny_model("llama").to(torch.bfloat16), tmp_path / "routers")
    with pytest.warns(UserWarning, match="tuned on 'tiny-llama'.*weights differ"):
        load_routers(tiny_model("llama", seed=1), tmp_path / "routers")
    with pytest.raises(SkipGPTError, match="drop --strict"):
        load_routers(tiny_model("llama", seed=1), tmp_path / "routers", strict=True)


def test_a_gguf_model_is_recorded_by_its_file_not_its_folder(tmp_path):
    assert _source_of(str(tmp_path / "m.gguf"), str(tmp_path), {"gguf_file": "m.gguf"}) == str(tmp_path.resolve() / "m.gguf")
    assert _source_of("smollm2-135m", "/cache/models/smollm2-135m", {}) == "smollm2-135m"


def test_pruned_loads_its_own_base_and_refuses_another(tmp_path, capsys):
    base = save_tiny_model_dir(tmp_path / "base")
    other = save_tiny_model_dir(tmp_path / "other")
    torch.manual_seed(3)
    model, _ = load_model(str(other))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the same shape, other weights (a fine-tune)
    model.save_pretrained(other)
    write_word_text(tmp_path / "train.txt", 8000, seed=0)
    write_word_text(tmp_path / "test.txt", 1000, seed=1)
    plan = tmp_path / "plan"
    assert main(["prune", "--model", str(base), "--method", "shortgpt", "--ratio", "0.3", "--data", str(tmp_path / "train.txt"),
                 "--calib-sequences", "2", "--calib-seq-len", "32", "--out", str(plan)]) == 0
    saved = json.loads((plan / "prune_config.json").read_text())
    assert saved["base_model"] == str(base.resolve()) and saved["base_fingerprint"]
    report = tmp_path / "eval.json"
    assert main(["eval", "--pruned", str(plan), "--data", str(tmp_path / "test.txt"), "--seq-len", "32", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["model"] == str(base.resolve())  # no --model: the plan's base
    capsys.readouterr()
    assert main(["eval", "--pruned", str(plan), "--model", str(other), "--data", str(tmp_path / "test.txt"), "--seq-len", "32"]) == 2
    assert f"load it with --model {base.resolve()}" in capsys.readouterr().err

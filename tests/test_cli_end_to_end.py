"""The CLI on a real (tiny) model directory: tune, resume, eval, and data-parallel tuning."""

from __future__ import annotations

import json

import pytest
from conftest import accelerate_launch, save_tiny_model_dir, write_word_text
from safetensors.torch import load_file

from skipgpt.cli import main

TUNE = ["--steps", "4", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--save-every", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "model")
    write_word_text(root / "train.txt", 8000, seed=0)
    write_word_text(root / "test.txt", 2000, seed=1)
    return root


def test_tune_then_eval(workspace, tmp_path, capsys):
    out = tmp_path / "routers"
    assert main(["tune", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"), *TUNE, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"router_config.json", "routers.safetensors", "train_log.jsonl", "results.json"}
    results = json.loads((out / "results.json").read_text())
    assert results["tokens_trained"] == 4 * 2 * 16
    assert results["calibration"]["calibration_tokens"] == 4 * 1024  # held out from the training text
    saved = json.loads((out / "router_config.json").read_text())
    assert saved["training"]["steps"] == 4 and saved["router"]["threshold"] == results["calibration"]["threshold"]

    report = tmp_path / "eval.json"
    args = ["eval", "--model", str(workspace / "model"), "--data", str(workspace / "test.txt"), "--seq-len", "32"]
    assert main([*args, "--routers", str(out), "--json", str(report)]) == 0
    routed = json.loads(report.read_text())["results"][str(workspace / "test.txt")]
    assert main([*args, "--json", str(report)]) == 0
    dense = json.loads(report.read_text())["results"][str(workspace / "test.txt")]
    assert routed["routed"] and not dense["routed"] and dense["sparsity"] is None
    assert routed["scored_tokens"] == dense["scored_tokens"] == routed["windows"] * 31
    assert 0.0 < routed["sparsity"]["param_ratio"] < 1.0 and routed["ppl"] != dense["ppl"]
    assert "| routed" in capsys.readouterr().out


def test_accelerate_launch_runs_the_cli_data_parallel(workspace, tmp_path):
    """`accelerate launch --num_processes 2 -m skipgpt tune ...`, on CPU (gloo)."""
    out = tmp_path / "ddp"
    proc = accelerate_launch(
        ["-m", "skipgpt", "tune", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"), *TUNE, "--out", str(out)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["tokens_trained"] == 4 * 2 * 2 * 16  # steps x batch x processes x seq_len
    assert set(load_file(str(out / "routers.safetensors"))) and not (out / "checkpoint").exists()


def test_finetune_export_eval(workspace, tmp_path, capsys):
    model = str(workspace / "model")
    data = ["--data", str(workspace / "train.txt")]
    small = ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--save-every", "3"]
    routers, adapter, exported = tmp_path / "routers", tmp_path / "adapter", tmp_path / "exported"
    assert main(["tune", "--model", model, *data, *TUNE, "--no-calibrate", "--out", str(routers)]) == 0
    assert main(["finetune", "--model", model, *data, "--routers", str(routers), *small, "--out", str(adapter)]) == 0
    assert json.loads((adapter / "results.json").read_text())["stage"] == "SkipGPT-RT-L"
    assert main(["finetune", "--model", model, *data, *small, "--out", str(tmp_path / "bad")]) == 2  # RT-L needs routers
    assert not (tmp_path / "bad").exists()
    assert main(["finetune", "--model", model, *data, "--dense", *small, "--out", str(tmp_path / "dense")]) == 0
    assert main(["finetune", "--model", model, *data, "--joint", *small, "--out", str(tmp_path / "joint")]) == 0
    assert main(["export", "--model", model, "--routers", str(routers), "--adapter", str(adapter), "--out", str(exported)]) == 0

    evals = {}
    for name, extra in {"adapter": ["--routers", str(routers), "--adapter", str(adapter)], "exported": []}.items():
        report = tmp_path / f"{name}.json"
        m = str(exported) if name == "exported" else model
        assert main(["eval", "--model", m, "--data", str(workspace / "test.txt"), "--seq-len", "32", *extra, "--json", str(report)]) == 0
        evals[name] = next(iter(json.loads(report.read_text())["results"].values()))
    assert evals["exported"]["ppl"] == pytest.approx(evals["adapter"]["ppl"], rel=1e-4)
    assert evals["exported"]["sparsity"]["param_ratio"] == pytest.approx(evals["adapter"]["sparsity"]["param_ratio"], abs=1e-3)
    assert main(["eval", "--model", str(exported), "--routers", str(routers), "--data", str(workspace / "test.txt")]) == 2

    # The tuned, LoRA-merged export loads routed through transformers' remote code as through skipgpt.
    import torch
    from transformers import AutoModelForCausalLM

    from skipgpt import routing_state
    from skipgpt.models import load_model

    ours, _ = load_model(str(exported))
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids).logits, remote(ids).logits
    assert torch.equal(routing_state(ours).stacked_gates(), routing_state(remote).stacked_gates())
    assert torch.equal(*logits)


def test_generate_skipping_equals_masked_and_reports_sparsity(workspace, tmp_path, capsys):
    import torch

    from skipgpt import RouterConfig, attach_routers, save_routers
    from skipgpt.models import load_model

    model, _ = load_model(str(workspace / "model"))
    attach_routers(model, RouterConfig(init_bias=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == 2:
                p.normal_(generator=torch.Generator().manual_seed(0))
    save_routers(model, tmp_path / "routers")
    args = ["generate", "--model", str(workspace / "model"), "--routers", str(tmp_path / "routers"),
            "--prompt", "the cat sat", "--prompt", "a dog ran over the hill and", "--max-new-tokens", "6"]
    assert main([*args, "--json", str(tmp_path / "skip.json")]) == 0
    assert main([*args, "--masked", "--json", str(tmp_path / "masked.json")]) == 0
    skip, masked = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("skip", "masked"))
    assert skip["texts"] == masked["texts"] and len(skip["texts"]) == 2
    assert 0.0 < skip["sparsity"]["module_sparsity"] < 1.0
    assert "parameter ratio skipped" in capsys.readouterr().out
    assert main(["generate", "--model", str(workspace / "model")]) == 2  # no prompt: clear error


def test_calibrate_with_an_adapter_sets_the_threshold_for_the_fine_tuned_model(workspace, tmp_path):
    routers, tuned, again = tmp_path / "routers", tmp_path / "rtl", tmp_path / "rtl_retargeted"
    data = ["--model", str(workspace / "model"), "--data", str(workspace / "train.txt")]
    assert main(["tune", *data, *TUNE, "--out", str(routers)]) == 0
    assert main(["finetune", *data, "--routers", str(routers), "--steps", "4", "--seq-len", "16", "--batch-size", "2",
                 "--lr", "1e-2", "--out", str(tuned)]) == 0
    assert main(["calibrate", *data, "--routers", str(tuned), "--adapter", str(tuned), "--target", "0.4", "--out", str(again)]) == 0
    record = json.loads((again / "router_config.json").read_text())["recalibration"]
    assert "LoRA adapter" in record["calibration_text"] and "--adapter" in record["command"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in again.iterdir()}
    assert main(["eval", *data, "--routers", str(again), "--adapter", str(again), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = next(iter(json.loads((tmp_path / "e.json").read_text())["results"].values()))
    assert abs(evaluated["sparsity"]["param_ratio"] - record["ratio_after"]) < 0.1  # the same model the threshold was set on
    assert main(["calibrate", *data, "--routers", str(routers), "--adapter", str(routers), "--target", "0.4",
                 "--out", str(tmp_path / "x")]) == 2  # tune's output holds no adapter: clear error


def test_tune_with_kv_policy_drop_records_it_and_generates(workspace, tmp_path):
    out = tmp_path / "drop"
    assert main(["tune", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"), *TUNE,
                 "--kv-policy", "drop", "--out", str(out)]) == 0
    assert json.loads((out / "router_config.json").read_text())["router"]["kv_policy"] == "drop"
    assert main(["generate", "--model", str(workspace / "model"), "--routers", str(out), "--prompt", "the cat",
                 "--max-new-tokens", "4", "--json", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["new_tokens"] > 0


def test_calibrate_retargets_trained_routers_without_training(workspace, tmp_path):
    routers, again = tmp_path / "routers", tmp_path / "retargeted"
    data = ["--model", str(workspace / "model"), "--data", str(workspace / "train.txt")]
    assert main(["tune", *data, *TUNE, "--out", str(routers)]) == 0
    assert main(["calibrate", *data, "--routers", str(routers), "--target", "0.4", "--out", str(again)]) == 0
    saved = json.loads((again / "router_config.json").read_text())
    assert abs(saved["recalibration"]["ratio_after"] - 0.4) <= 0.02  # on the held-out calibration text
    assert saved["recalibrated_from"] == str(routers) and saved["training"]["steps"] == 4
    before = load_file(str(routers / "routers.safetensors"))
    after = load_file(str(again / "routers.safetensors"))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)  # weights untouched
    assert main(["calibrate", *data, "--routers", str(routers), "--target", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["calibrate", *data, "--routers", str(routers), "--target", "0.4", "--tolerance", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # In-domain: the start of a named set's validation split, never trained on.
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    write_word_text(tmp_path / "data" / "wikitext2" / "wiki.valid.raw", 6000, seed=5)
    valid = tmp_path / "in_domain"
    assert main(["calibrate", "--model", str(workspace / "model"), "--data-dir", str(tmp_path / "data"), "--data", "wikitext2",
                 "--split", "valid", "--routers", str(routers), "--target", "0.3", "--tolerance", "0.01", "--out", str(valid)]) == 0
    record = json.loads((valid / "router_config.json").read_text())["recalibration"]
    assert abs(record["ratio_after"] - 0.3) <= 0.01 and record["tolerance"] == 0.01 and "WikiText-2" in record["calibration_text"]
    assert record["calibration_text"].startswith("4096 tokens") and "(valid split)" in record["calibration_text"]
    assert record["command"].startswith("skipgpt calibrate ") and "--split valid" in record["command"]


def test_tune_with_a_replacement_and_the_deployed_routing_records_the_recipe(workspace, tmp_path):
    out = tmp_path / "replaced"
    assert main(["tune", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"), *TUNE,
                 "--replacement", "lowrank", "--replacement-rank", "4", "--noise-end", "0", "--noise-from", "0.5", "--lr-schedule", "cosine",
                 "--lr-decay-from", "0.5", "--hidden-distill", "0.5", "--out", str(out)]) == 0
    saved = json.loads((out / "router_config.json").read_text())
    assert (saved["router"]["replacement"], saved["router"]["replacement_rank"]) == ("lowrank", 4)
    training = saved["training"]
    assert (training["noise_end"], training["noise_from"], training["lr_schedule"], training["lr_decay_from"], training["hidden_distill"]) \
        == (0.0, 0.5, "cosine", 0.5, 0.5)
    assert saved["command"].startswith("skipgpt tune --model ") and "--replacement lowrank" in saved["command"]
    assert any(".replacement.up" in k for k in load_file(str(out / "routers.safetensors")))
    results = json.loads((out / "results.json").read_text())
    assert results["replacement_fit"]["fit_tokens"] > 0
    assert main(["eval", "--model", str(workspace / "model"), "--routers", str(out), "--data", str(workspace / "train.txt"),
                 "--seq-len", "16", "--max-windows", "2", "--json", str(tmp_path / "e.json")]) == 0

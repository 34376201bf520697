"""Static depth baselines (removal is physical, ratios met within granularity), the dynamic
baselines' decision rules, and `skipgpt prune` / `skipgpt compare` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, save_tiny_model_dir, tiny_model, write_word_text
from safetensors.torch import load_file

from skipgpt.baselines import get_method, load_pruned, save_pruned
from skipgpt.baselines.dynamic import dynamic_router_config
from skipgpt.baselines.save_load import WEIGHTS_NAME
from skipgpt.baselines.structure import decoder_parameter_count, module_parameter_counts, remove_modules
from skipgpt.cli import main
from skipgpt.config import TuneConfig
from skipgpt.errors import SkipGPTError
from skipgpt.routing.adapters import KINDS
from skipgpt.routing.routers import budget_gate, topk_gate
from skipgpt.routing.surgery import attach_routers, gate_mode, routing_state
from skipgpt.training.tune import tune_routers

DEPTH = ["shortgpt", "joint-layer-drop", "shortened-ppl", "shortened-taylor", "laco"]
LAYERS = 8


@pytest.mark.parametrize("name", DEPTH)
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_depth_method_meets_ratio_removes_modules_and_round_trips(name, model_type, tmp_path):
    model = tiny_model(model_type, num_hidden_layers=LAYERS)
    counts = module_parameter_counts(model)
    before = decoder_parameter_count(model)
    ids = random_ids(2, 24, seed=3)
    plan = get_method(name).prune(model, random_ids(4, 32, seed=1), 0.25)

    # the requested ratio within the granularity: half a layer (or half of the largest module)
    unit = counts.view(-1, 2).sum(-1).max() if name != "joint-layer-drop" else counts.max()
    assert abs(plan.achieved_ratio - 0.25) <= float(unit / counts.sum()) / 2 + 1e-9
    # really gone: fewer parameters, by exactly the reported share, and absent from the state dict
    after = decoder_parameter_count(model)
    assert after < before and abs((1 - after / before) - plan.achieved_ratio) < 1e-9
    whole = {i for i, _ in plan.removed if sum(1 for j, _ in plan.removed if j == i) == 2}
    assert len(model.model.layers) == LAYERS - len(whole)
    assert model.config.num_hidden_layers == LAYERS - len(whole)

    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 24, model.config.vocab_size) and torch.isfinite(logits).all()

    save_pruned(model, plan, tmp_path / name)
    saved = load_file(str(tmp_path / name / WEIGHTS_NAME)) if plan.changed else {}
    assert (name == "laco") == bool(saved)  # only LaCo changes weights; the rest is a plan
    fresh = tiny_model(model_type, num_hidden_layers=LAYERS)
    load_pruned(fresh, tmp_path / name)
    torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("removed", [[(0, "attn")], [(0, "attn"), (0, "mlp"), (2, "mlp")], [(1, "attn"), (3, "attn")]])
def test_generation_with_cache_after_removal_equals_recomputation(removed):
    """Cached decoding must survive removed attention (even layer 0's, whose cache layer
    transformers reads to count positions) and removed layers."""
    model = tiny_model("llama", num_hidden_layers=4)
    remove_modules(model, removed)
    prompt = random_ids(1, 6, seed=2)
    cached = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    plain = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    names = {n for n, _ in model.named_parameters()}
    for layer, kind in removed:  # indices here are those of the unpruned model; check by original index
        kept = [i for i, l in enumerate(model.model.layers) if l.skipgpt_original_index == layer]
        module = "self_attn" if kind == "attn" else "mlp"
        assert not kept or not any(n.startswith(f"model.layers.{kept[0]}.{module}.") for n in names)


def test_removal_refuses_bad_plans():
    model = tiny_model("llama")
    with pytest.raises(SkipGPTError, match="cannot remove"):
        remove_modules(model, [(7, "attn")])
    with pytest.raises(SkipGPTError, match="every layer"):
        remove_modules(model, [(i, k) for i in range(3) for k in KINDS])


def test_calibration_never_touches_evaluation_text(tmp_path):
    """compare's calibration and training ids come from --data only (disjoint token ranges)."""
    from conftest import WordIdTokenizer

    from skipgpt.baselines.compare import CompareConfig, split_training_text

    docs = [" ".join(f"t{k}" for k in range(i * 100, (i + 1) * 100)) for i in range(60)]
    cfg = CompareConfig(calib_sequences=2, calib_seq_len=50, tune=TuneConfig(seq_len=32))
    train, calib = split_training_text(WordIdTokenizer(), docs, cfg)
    assert set(train.flatten().tolist()).isdisjoint(calib.flatten().tolist())
    assert calib.max() == 5999  # the held-out tail


def test_mod_topk_executes_exactly_k_real_tokens():
    logits = torch.randn(3, 10, 2)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    hard = topk_gate(logits, mask, 0.75, train=False)
    assert hard.sum(-1).tolist() == [8, 5, 8]  # ceil(0.75 · real tokens)
    assert not hard[1, :4].any()
    soft = topk_gate(logits.requires_grad_(), mask, 0.75, train=True)
    torch.testing.assert_close(soft.detach(), hard.float())
    soft.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_budget_gate_gives_every_token_its_budget():
    torch.manual_seed(0)
    layers, budget = 6, 4
    executed = torch.zeros(5, 7)
    for layer in range(layers):
        gate = budget_gate(torch.rand(5, 7) > 0.5, executed, layer, layers, budget)
        executed += gate.float()
    assert (executed == budget).all()


@pytest.mark.parametrize("name", ["mod-d", "d-llm"])
def test_dynamic_baseline_trains_and_honours_its_budget(name, tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    cfg = TuneConfig(target=0.25, steps=2, batch_size=2, seq_len=16)
    results = tune_routers(model, random_ids(8, 16), cfg, tmp_path, router_config=dynamic_router_config(name, 0.25),
                           calib_ids=random_ids(2, 16, seed=5), progress=False)
    assert results["router"]["routing"] == name
    with torch.no_grad(), gate_mode(model, "argmax"):
        model(input_ids=random_ids(2, 16, seed=9))
        gates = routing_state(model).stacked_gates()  # [2L, B, T]
    if name == "mod-d":
        assert (gates.sum(-1) == 12).all()  # every module executes ceil(0.75 · 16) tokens of each sequence
    else:
        assert torch.equal(gates[0::2], gates[1::2])  # attention and MLP decided together
        assert (gates[0::2].sum(0) == 3).all()  # every token executes round(0.75 · 4) layers
        assert routing_state(model).config.kv_policy == "drop"


def test_prune_and_compare_cli_end_to_end(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    train = write_word_text(tmp_path / "train.txt", 6000)
    test = write_word_text(tmp_path / "test.txt", 800, seed=7)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "shortgpt", "--ratio", "0.34", "--data", str(train),
                 "--calib-sequences", "2", "--calib-seq-len", "64", "--out", str(out)]) == 0
    plan = json.loads((out / "prune_config.json").read_text())
    assert plan["method"] == "shortgpt" and len(plan["removed"]) == 2  # one of the three layers
    assert main(["eval", "--model", str(model_dir), "--pruned", str(out), "--data", str(test), "--seq-len", "32",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["pruned"] == str(out)

    cmp = tmp_path / "cmp"
    args = ["compare", "--model", str(model_dir), "--ratio", "0.34", "--methods", "shortgpt,joint-layer-drop,mod-d",
            "--data", str(train), "--eval", str(test), "--seq-len", "32", "--calib-sequences", "2",
            "--calib-seq-len", "64", "--steps", "2", "--out", str(cmp)]
    assert main(args) == 0
    rows = json.loads((cmp / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "shortgpt", "joint-layer-drop", "mod-d"]
    assert all(r["ppl"][str(test)] > 1 for r in rows)
    # MoD-D executes the top 66 % of each window's tokens (whole tokens of 32-token windows); its
    # routers cost every token their parameters (4 % of this tiny model's decoder, 2·32 + 2 a module)
    routers = attach_routers(tiny_model("llama"), dynamic_router_config("mod-d", 0.34))
    share = routing_state(routers).router_share
    assert share > 0.01
    assert abs(rows[3]["achieved_ratio"] + share - 0.34) <= 1 / 32
    assert "| ShortGPT" in (cmp / "comparison.md").read_text()
    # Every row records how it was made and the ratio each evaluation set got.
    assert all(r["command"].startswith("skipgpt compare --model") and r["commit"] for r in rows)
    assert rows[1]["ratios"] == {str(test): rows[1]["achieved_ratio"]}  # static: the same parameters everywhere
    assert rows[3]["ratios"][str(test)] == rows[3]["achieved_ratio"]
    assert {p.name for p in cmp.glob("scoreboard.*")} == {"scoreboard.json", "scoreboard.md", "scoreboard.png"}
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses every row
    assert capsys.readouterr().out.count("[compare] reusing") == 4
    assert main([*args[:6], "shortgpt,laco", *args[7:], "--report-only"]) == 0  # laco never ran: left out
    assert "laco at ratio 0.34: not run yet" in capsys.readouterr().out
    report = json.loads((cmp / "comparison.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["dense", "shortgpt"] and report["pending"] == ["laco_0.34"]
    assert "Not run yet, 1 row: laco_0.34." in (cmp / "scoreboard.md").read_text()
    assert main(["compare", "--model", str(model_dir), "--methods", "nope", "--data", str(train), "--eval", str(test),
                 "--out", str(tmp_path / "x")]) == 2


def test_compare_stage_two_rows(tmp_path, capsys):
    """--lora-steps adds dense + LoRA, SkipGPT-RT-L over the SkipGPT-RT row, SkipGPT-Joint with as many
    training tokens as RT plus RT-L, and LoRA for the --lora-static best static methods only."""
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    train = write_word_text(tmp_path / "train.txt", 6000)
    test = write_word_text(tmp_path / "test.txt", 800, seed=7)
    cmp = tmp_path / "cmp"
    args = ["compare", "--model", str(model_dir), "--ratio", "0.34", "--methods", "joint-layer-drop,shortgpt,skipgpt-rt",
            "--data", str(train), "--eval", str(test), "--seq-len", "32", "--calib-sequences", "2", "--calib-seq-len", "64",
            "--steps", "2", "--lora-steps", "2", "--lora-static", "1", "--lora-lr", "4e-4", "--lora-bf16",
            "--lora-train-replacements", "--out", str(cmp)]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((cmp / "comparison.json").read_text())["rows"]}
    # One stage-2 recipe for every LoRA row; only RT-L has replacements to train.
    recipes = {m: json.loads((cmp / d / "results.json").read_text())["finetune"]
               for m, d in (("dense, LoRA", "dense_lora"), ("skipgpt-rt, LoRA", "skipgpt-rt_0.34_lora"), ("skipgpt-joint", "skipgpt-joint_0.34"))}
    assert {(r["lr"], r["bf16"]) for r in recipes.values()} == {(4e-4, True)}
    assert [m for m, r in recipes.items() if r["train_replacements"]] == ["skipgpt-rt, LoRA"]
    assert "lr 0.0004, bf16, replacements trained" in rows["skipgpt-rt, LoRA"]["budget"]
    static = sorted(("joint-layer-drop", "shortgpt"), key=lambda m: rows[m]["ppl"][str(test)])
    assert set(rows) == {"dense", "joint-layer-drop", "shortgpt", "skipgpt-rt", "dense, LoRA", "skipgpt-rt, LoRA",
                         "skipgpt-joint", f"{static[0]}, LoRA"}
    best = rows[f"{static[0]}, LoRA"]
    assert best["kind"] == "static + LoRA" and best["achieved_ratio"] == rows[static[0]]["achieved_ratio"]
    assert best["ppl"] != rows[static[0]]["ppl"] and (cmp / f"{static[0]}_0.34_lora" / "adapter_config.json").is_file()
    rtl, rt, joint = rows["skipgpt-rt, LoRA"], rows["skipgpt-rt"], rows["skipgpt-joint"]
    assert rtl["label"] == "SkipGPT-RT-L" and rtl["kind"] == "dynamic + LoRA" and 0 < rtl["achieved_ratio"] < 1
    assert rt["train_tokens"] == 2 * 4 * 256 and rtl["train_tokens"] == 2 * rt["train_tokens"] == joint["train_tokens"]
    assert "stage 1 train" in rtl["wall_s"] and (cmp / "skipgpt-rt_0.34_lora" / "adapter_config.json").is_file()
    # The fine-tuning's own total (every sitting of a resumed one), not the last process's share.
    assert rtl["wall_s"]["LoRA"] == json.loads((cmp / "skipgpt-rt_0.34_lora" / "results.json").read_text())["wall_s"]
    assert rows["dense, LoRA"]["kind"] == "dense + LoRA" and rows["dense, LoRA"]["ppl"] != rows["dense"]["ppl"]
    assert "LoRA (routed)" in capsys.readouterr().err  # training shows its progress bar
    assert main(args) == 0  # every row reused, stage 2 included
    assert capsys.readouterr().out.count("[compare] reusing") == 8
    # LoRA rows stopped after their fine-tuning: evaluated from what it saved, not trained again.
    lora_dirs = {"dense, LoRA": "dense_lora", "skipgpt-rt, LoRA": "skipgpt-rt_0.34_lora", "skipgpt-joint": "skipgpt-joint_0.34"}
    for d in lora_dirs.values():
        (cmp / d / "row.json").unlink()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.count("finished earlier: evaluating it") == 3 and "LoRA (" not in err  # no training progress bar
    again = {r["method"]: r for r in json.loads((cmp / "comparison.json").read_text())["rows"]}
    for m in lora_dirs:
        assert again[m]["ppl"] == pytest.approx(rows[m]["ppl"], rel=1e-6) and again[m]["achieved_ratio"] == pytest.approx(rows[m]["achieved_ratio"])
    # A router set trained elsewhere is scored as a row, and gets its own LoRA row.
    assert main([*args, "--router-set", f"tuned earlier={cmp / 'skipgpt-rt_0.34'}"]) == 0
    rows = json.loads((cmp / "comparison.json").read_text())["rows"]
    tuned = [r for r in rows if r["label"].startswith("tuned earlier")]
    assert [(r["method"], r["kind"]) for r in tuned] == [("router-set", "dynamic"), ("router-set, LoRA", "dynamic + LoRA")]
    assert tuned[0]["ppl"] == rows[[r["method"] for r in rows].index("skipgpt-rt")]["ppl"]  # the same routers, the same protocol
    assert tuned[0]["target_ratio"] == 0.34 and tuned[0]["train_tokens"] == rt["train_tokens"]
    # --methods "": no method, only the dense rows and the router sets (a sitting that scores those first).
    assert main([*args, "--methods", "", "--router-set", f"tuned earlier={cmp / 'skipgpt-rt_0.34'}"]) == 0
    rows = json.loads((cmp / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "router-set", "dense, LoRA", "router-set, LoRA"]
    assert main([*args, "--router-set", "no label"]) == 2



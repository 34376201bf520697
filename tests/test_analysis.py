"""The routing analyses (paper figures 2, 5, 6, 7): computations on tiny models, and the
``skipgpt analyze`` command writing a PNG and its JSON for every kind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CharTokenizer, forbid_model_loading, save_tiny_model_dir, tiny_model, write_word_text

from skipgpt.cli import main
from skipgpt.config import RouterConfig
from skipgpt.evaluation import analysis
from skipgpt.routing.save_load import save_routers
from skipgpt.routing.surgery import attach_routers, has_routers, routing_state
from skipgpt.training.importance import module_importance

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def routed_tiny(seed: int = 0, bias: float = 0.0) -> torch.nn.Module:
    """Tiny llama with random routers (init bias 0: a mix of executed and skipped modules)."""
    model = tiny_model("llama")
    torch.manual_seed(seed)
    return attach_routers(model, RouterConfig(init_bias=bias))


def test_text_sequences_are_consecutive_windows():
    ids = analysis.text_sequences(CharTokenizer(), TEXT, 40, num_seqs=3, offset=5)
    assert ids.shape == (3, 40)
    full = torch.tensor(CharTokenizer()(TEXT)["input_ids"])
    assert torch.equal(ids.flatten(), full[5:125])
    short = analysis.text_sequences(CharTokenizer(), "abc", 40)
    assert short.shape == (1, 3)


def test_cosine_is_per_token_block_influence_and_leaves_no_routers():
    model = tiny_model("llama")
    ids = analysis.text_sequences(CharTokenizer(), TEXT, 24)
    result = analysis.cosine_analysis(model, ids[0])
    cos = torch.tensor(result["cosine"])
    assert cos.shape == (24, 6) and result["modules"][:2] == ["L0 attn", "L0 MLP"]
    assert not has_routers(model)  # temporary routers removed
    assert (cos <= 1 + 1e-5).all() and (cos >= -1 - 1e-5).all()
    attach_routers(model)
    torch.testing.assert_close(1 - cos.double().mean(0), module_importance(model, ids), atol=1e-5, rtol=0)
    assert len(result["important_modules_per_token"]) == 24 and len(result["redundant_tokens_per_module"]) == 6


def test_routing_map_and_sparsity_split_agree():
    model = routed_tiny()
    ids = analysis.text_sequences(CharTokenizer(), TEXT, 32)
    result = analysis.routing_analysis(model, ids[0])
    executed = torch.tensor(result["executed"], dtype=torch.float64)
    assert executed.shape == (32, 6) and set(executed.unique().tolist()) <= {0.0, 1.0}
    assert 0 < executed.mean() < 1, "random routers should execute some modules and skip others"
    params, replacements = routing_state(model).module_params.double(), routing_state(model).replacement_params.double()
    assert replacements.min() > 0  # a skipped module still costs its replacement
    routers = routing_state(model).router_params.double().sum()  # every token runs every router
    assert routers > 0
    cost = executed @ params + (1 - executed) @ replacements + routers
    torch.testing.assert_close(torch.tensor(result["param_fraction_executed"], dtype=torch.float64), cost / params.sum())
    torch.testing.assert_close(torch.tensor(result["module_fraction_executed"], dtype=torch.float64), executed.mean(1))
    split = analysis.sparsity_split(model, ids)
    assert split["tokens"] == 32
    for key in ("attn_sparsity", "mlp_sparsity", "module_sparsity", "param_ratio"):
        assert split[key] == pytest.approx(result[key], abs=1e-6), key


def test_context_shift_windows():
    model = routed_tiny()
    ids = analysis.text_sequences(CharTokenizer(), TEXT, 60, num_seqs=3)
    result = analysis.context_shift(model, ids, window=10)
    assert len(result["attn_ratio"]) == len(result["mlp_ratio"]) == len(result["positions"]) == 60 - 10 + 1
    assert result["positions"][0] == 9 and result["num_seqs"] == 3
    gates = analysis.argmax_gates(model, ids)
    naive = torch.stack([gates[:, t - 9 : t + 1, 0::2].mean((1, 2)) for t in range(9, 60)], 1).mean(0)
    torch.testing.assert_close(torch.tensor(result["attn_ratio"], dtype=torch.float64), naive.double())
    with pytest.raises(analysis.SkipGPTError):
        analysis.context_shift(model, ids, window=61)


def test_ppl_points_accepts_eval_json_and_rows(tmp_path):
    rt = tmp_path / "rt"
    save_routers(routed_tiny(), rt, extra={"training": {"target": 0.4, "target_unit": "params"}})
    (tmp_path / "rt.json").write_text(json.dumps({"model": "m", "routers": str(rt), "adapter": None, "results": {
        "wikitext2": {"ppl": 30.0, "sparsity": {"param_ratio": 0.41, "module_sparsity": 0.4}}}}))
    (tmp_path / "dense.json").write_text(json.dumps({"model": "m", "routers": None, "results": {"wikitext2": {"ppl": 20.0}}}))
    (tmp_path / "rows.json").write_text(json.dumps([
        {"method": "Joint Layer Drop", "achieved_ratio": 0.25, "wikitext2_ppl": 90.0},
        {"method": "Joint Layer Drop", "ratio": 0.5, "ppl": 900.0}]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"rows": [{"method": "x", "ratio": 0.1, "ppl": 21.0}]}))
    (tmp_path / "comparison.json").write_text(json.dumps({"model": "m", "rows": [  # what skipgpt compare writes
        {"method": "skipgpt-rt", "target_ratio": 0.25, "achieved_ratio": 0.24, "ppl": {"wikitext2": 70.0, "ptb": 190.0},
         "eval": {"wikitext2": {"ppl": 70.0, "windows": 32, "seq_len": 1024}}},
        {"method": "shortgpt, LoRA", "achieved_ratio": 0.27, "ppl": {"wikitext2": 50.0}}]}))
    files = ["rt.json", "dense.json", "rows.json", "mine=wrapped.json", "comparison.json"]
    result = analysis.ppl_points([str(tmp_path / f) if "=" not in f else f"mine={tmp_path / 'wrapped.json'}" for f in files])
    got = {(p["method"], p["ratio"], p["ppl"]) for p in result["points"]}
    assert got == {("SkipGPT-RT", 0.41, 30.0), ("dense", 0.0, 20.0), ("Joint Layer Drop", 0.25, 90.0),
                   ("Joint Layer Drop", 0.5, 900.0), ("mine", 0.1, 21.0), ("SkipGPT-RT", 0.24, 70.0),
                   ("ShortGPT + LoRA", 0.27, 50.0)}
    assert result["models"] == ["m"]
    names = [str(tmp_path / f) for f in ("comparison.json", "dense.json", "rows.json")]
    only = analysis.ppl_points(names, methods=["joint-layer-drop"])  # compare's id selects the named method
    assert {p["method"] for p in only["points"]} == {"Joint Layer Drop", "dense"}
    (tmp_path / "bad.json").write_text(json.dumps([{"method": "x"}]))
    with pytest.raises(analysis.SkipGPTError, match="lacks"):
        analysis.ppl_points([str(tmp_path / "bad.json")])


# ---------------------------------------------------------------------------------------------
# The command line, on a tiny model directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from skipgpt.training.finetune import FinetuneConfig, add_lora

    root = tmp_path_factory.mktemp("analyze")
    save_tiny_model_dir(root / "model")
    write_word_text(root / "text.txt", 400)
    for name, target, seed in (("t50", 0.5, 1), ("t25", 0.25, 2)):
        save_routers(routed_tiny(seed), root / name, extra={"training": {"target": target, "target_unit": "params"}})
    model = routed_tiny(3)  # a stage-2 directory: routers + LoRA adapter, target from results.json
    model.name_or_path = model.config._name_or_path = str(root / "model")  # PEFT looks the base model up: local, not the hub
    save_routers(model, root / "lora", extra={"training": {"mode": "routed"}})
    (root / "lora" / "results.json").write_text(json.dumps({"finetune": {"joint": {"target": 0.25}}}))
    add_lora(model, FinetuneConfig()).save_pretrained(root / "lora")
    return root


def run_analyze(workspace, tmp_path, kind, *extra, capsys=None):
    argv = ["analyze", kind, "--model", str(workspace / "model"), "--text-file", str(workspace / "text.txt"),
            "--out", str(tmp_path), *extra]
    assert main(argv) == 0
    png = tmp_path / f"analysis_{kind.replace('-', '_')}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    return json.loads(png.with_suffix(".json").read_text())


def test_cli_cosine(workspace, tmp_path):
    result = run_analyze(workspace, tmp_path, "cosine", "--seq-len", "20")
    assert torch.tensor(result["cosine"]).shape == (20, 6)
    assert len(result["tokens"]) == 20 and result["tokens"][0].startswith("w")
    assert result["model"] == str(workspace / "model")


def test_cli_routing(workspace, tmp_path):
    result = run_analyze(workspace, tmp_path, "routing", "--routers", str(workspace / "t25"), "--seq-len", "30")
    executed = torch.tensor(result["executed"])
    assert executed.shape == (30, 6) and set(executed.unique().tolist()) <= {0, 1}
    assert len(result["param_fraction_executed"]) == 30
    assert result["router_set"]["target"] == 0.25 and "t25" in result["context"]


def test_cli_sparsity_split(workspace, tmp_path, capsys):
    dirs = ",".join(str(workspace / n) for n in ("t50", "t25", "lora"))
    result = run_analyze(workspace, tmp_path, "sparsity-split", "--routers", dirs, "--seq-len", "50", "--num-seqs", "2")
    sets = result["router_sets"]
    assert [(s["name"], s["target"]) for s in sets] == [("lora", 0.25), ("t25", 0.25), ("t50", 0.5)]
    assert sets[0]["method"] == "SkipGPT-RT-L" and sets[0]["adapter"] and sets[1]["adapter"] is None
    assert all(s["tokens"] == 100 and 0 <= s["attn_sparsity"] <= 1 and 0 <= s["mlp_sparsity"] <= 1 for s in sets)
    assert "attention skipped" in capsys.readouterr().out


def test_cli_context_shift(workspace, tmp_path):
    result = run_analyze(workspace, tmp_path, "context-shift", "--routers", str(workspace / "t50"),
                         "--seq-len", "64", "--num-seqs", "3", "--window", "16")
    assert result["num_seqs"] == 3 and len(result["attn_ratio"]) == len(result["mlp_ratio"]) == 64 - 16 + 1


def test_cli_ppl_curve_needs_no_model(workspace, tmp_path, monkeypatch):
    forbid_model_loading(monkeypatch, lambda *a, **k: pytest.fail("ppl-curve loaded a model"))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"method": m, "ratio": r, "ppl": p} for m, r, p in
                                [("SkipGPT-RT", 0.25, 30), ("SkipGPT-RT", 0.5, 60), ("Joint Layer Drop", 0.25, 80), ("dense", 0, 20)]]))
    assert main(["analyze", "ppl-curve", "--results", str(rows), "--out", str(tmp_path / "fig"),
                 "--json", str(tmp_path / "curve.json")]) == 0
    assert (tmp_path / "fig" / "analysis_ppl_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert len(json.loads((tmp_path / "curve.json").read_text())["points"]) == 4


def test_cli_learning_curve_plots_ppl_against_tokens_trained(tmp_path, monkeypatch):
    forbid_model_loading(monkeypatch, lambda *a, **k: pytest.fail("learning-curve loaded a model"))
    files = []
    for name, tokens, ppl, ratio in (("short", 1000, 60.0, 0.24), ("long", 4000, 40.0, 0.25)):
        routers = tmp_path / name
        routers.mkdir()
        (routers / "results.json").write_text(json.dumps({"tokens_trained": tokens, "wall_s": tokens / 100}))
        (routers / "router_config.json").write_text(json.dumps({"format": "skipgpt-routers", "version": 2, "router": {}}))
        ev = tmp_path / f"{name}.json"
        ev.write_text(json.dumps({"model": "m", "routers": str(routers), "results": {
            "wikitext2": {"ppl": ppl, "windows": 4, "seq_len": 64, "sparsity": {"param_ratio": ratio}}}}))
        files.append(f"recipe={ev}")
    # a set re-calibrated by `skipgpt calibrate` has no training record of its own: its source's counts
    recalibrated = tmp_path / "long_recalibrated"
    recalibrated.mkdir()
    (recalibrated / "router_config.json").write_text(json.dumps({
        "format": "skipgpt-routers", "version": 2, "router": {}, "recalibrated_from": str(tmp_path / "long")}))
    ev = tmp_path / "recalibrated.json"
    ev.write_text(json.dumps({"model": "m", "routers": str(recalibrated), "results": {
        "wikitext2": {"ppl": 42.0, "windows": 4, "seq_len": 64, "sparsity": {"param_ratio": 0.26}}}}))
    files.append(f"recalibrated={ev}")
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"model": "m", "routers": None, "results": {"wikitext2": {"ppl": 20.0, "windows": 4, "seq_len": 64}}}))
    assert main(["analyze", "learning-curve", "--results", ",".join([*files, str(dense)]), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "analysis_learning_curve.png").read_bytes()[:8] == PNG_MAGIC
    result = json.loads((tmp_path / "fig" / "analysis_learning_curve.json").read_text())
    curve = [(p["tokens"], p["ppl"]) for p in result["points"] if p["series"] == "recipe"]
    assert curve == [(1000, 60.0), (4000, 40.0)]
    assert [(p["tokens"], p["ppl"]) for p in result["points"] if p["series"] == "recalibrated"] == [(4000, 42.0)]
    assert [p["ppl"] for p in result["points"] if p["series"] == "dense"] == [20.0]
    assert "first 4 windows of 64 tokens" in result["context"]


@pytest.mark.parametrize("argv, message", [
    (["routing"], "needs --routers"),
    (["sparsity-split"], "needs --routers"),
    (["cosine"], "needs text"),
    (["ppl-curve"], "needs --results"),
    (["routing", "--routers", "MISSING", "--text", "x"], "no router_config.json"),
])
def test_cli_bad_input_fails_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch, lambda *a, **k: pytest.fail("loaded a model before validating"))
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err

"""benchmarks/speed.py and benchmarks/frontier.py keep their books right on a tiny model: pairs
alternate A/B then B/A, each row's median lies in its range and IQR, ideal speedups and KV bytes
come from the untimed warm-up, router sets are labelled by the KV policy they ran with, a pruned
model of its own is timed against the shared dense one, and the frontier's comparison at equal
speed picks the right routed point."""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, random_ids, tiny_model

from skipgpt import attach_routers, has_routers, routing_state, save_routers
from skipgpt.baselines import remove_modules
from skipgpt.identity import code_revision

sys.path.insert(0, str(REPO / "benchmarks"))
import frontier  # noqa: E402
import speed  # noqa: E402


def options(**kw) -> argparse.Namespace:
    base = dict(routers="", ratios=[0.4], kv_policies=["keep", "drop"], pairs=2, new_tokens=2, device="cpu", min_prefill_s=0.0)
    return argparse.Namespace(**{**base, **kw})


def check_row(row: dict, pairs: int) -> None:
    for phase in ("prefill", "decode"):
        ratios = row[f"{phase}_speedup_ratios"]
        assert len(ratios) == pairs
        assert row[f"{phase}_speedup_min"] <= row[f"{phase}_speedup_q1"] <= row[f"{phase}_speedup"]
        assert row[f"{phase}_speedup"] <= row[f"{phase}_speedup_q3"] <= row[f"{phase}_speedup_max"]
        times = [(t[f"dense_{phase}_s"], t[f"{phase}_s"]) for t in row["pair_times"]]
        assert row[f"{phase}_speedup_best"] == min(d for d, _ in times) / min(r for _, r in times)  # best against best
    assert [p["dense_first"] for p in row["pair_times"]][:2] in ([True, False], [False, True])  # A/B, then B/A


def test_synthetic_rows_pairs_and_policies() -> None:
    model = tiny_model("llama")
    args = options()
    configs = speed.make_configs(model, args, random_ids(1, 32))
    assert [(c.name, c.policy) for c in configs] == [("HF dense", "keep"), ("nothing skipped", "keep"), ("nothing skipped", "drop"),
                                                     ("skip 0.40", "keep"), ("skip 0.40", "drop")]
    rows = speed.bench_cell(model, configs, random_ids(2, 12), args)
    assert not has_routers(model)  # dense is the plain model again after every routed run
    dense, *routed = rows
    assert dense["prefill_speedup"] == dense["decode_speedup"] == 1.0 and dense["param_ratio"] is None
    assert len(dense["prefill_s"]) == 2 * len(routed)  # one dense run per pair
    for row in routed:
        check_row(row, 2)
    nothing = [r for r in routed if r["config"] == "nothing skipped"]
    # nothing skipped: the routers' own FLOPs are all that differs from dense, so the ideal is just under 1
    assert all(r["param_ratio"] < 0.0 and 0.9 < r["prefill_ideal"] < 1.0 for r in nothing)  # the routers' own cost
    keep, drop = (r for r in routed if r["config"] == "skip 0.40")
    assert keep["prefill_ideal"] > 1.0 and drop["kv_mib"] < keep["kv_mib"]  # "drop" stores only executing tokens' keys
    headers, lines = speed.markdown_rows(rows)
    assert all(len(line) == len(headers) for line in lines)


def test_router_set_rows_are_labelled_by_the_policy_run(tmp_path) -> None:
    model = tiny_model("llama")
    attach_routers(model)
    routing_state(model).config.threshold = 0.25
    save_routers(model, tmp_path / "set")
    speed.detach_routers(model)
    args = options(routers=str(tmp_path / "set"), ratios=[], pairs=1)
    configs = speed.make_configs(model, args, None)
    assert [(c.name, c.routing) for c in configs[1:]] == [
        ("nothing skipped", "set routers, threshold -inf, keep"), ("nothing skipped", "set routers, threshold -inf, drop"),
        ("set", "trained (keep)"), ("set", "trained with keep, run with drop")]
    configs[3].apply(model)
    assert routing_state(model).config.threshold == 0.25
    speed.detach_routers(model)


def test_a_model_of_its_own_is_timed_against_the_shared_dense_one() -> None:
    model = tiny_model("llama")
    pruned = copy.deepcopy(model)
    remove_modules(pruned, [(0, "attn"), (0, "mlp")])  # one of three layers
    args = options(pairs=2)
    rows = speed.bench_cell(model, [speed.Config("HF dense", "none"), speed.Config("pruned", "static", model=pruned)],
                            random_ids(1, 8), args)
    check_row(rows[1], 2)
    assert rows[1]["decode_ideal"] == pytest.approx(1.5, rel=0.3)  # two of three layers' FLOPs (plus the LM head)


def test_ratio_stats() -> None:
    stats = speed.ratio_stats([1.0, 1.2, 0.8, 1.1, 0.9])
    assert (stats["median"], stats["min"], stats["max"], stats["q1"], stats["q3"]) == pytest.approx((1.0, 0.8, 1.2, 0.9, 1.1))
    assert speed.ratio_stats([1.3])["q1"] == speed.ratio_stats([1.3])["q3"] == 1.3
    assert speed.ratio_stats([])["median"] is None


def test_quick_flags_are_defaults_that_given_flags_override() -> None:
    assert speed.parse_args(["--quick"]).pairs == 1 and speed.parse_args(["--quick", "--pairs", "3"]).pairs == 3
    assert speed.parse_args(["--batch-sizes", "1,8", "--prompt-lens", "128"]).prompt_lengths == [128]
    args = frontier.parse_args(["--quick", "--max-windows", "2"])
    assert args.max_windows == 2 and args.pairs == 1 and args.out.startswith("/tmp/")
    assert frontier.parse_args(["--max-windows", "4"]).out == "runs/frontier/frontier_smollm2_quick"  # never over the real results
    git = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if git.returncode == 0:  # a checkout: every result names the commit it was made at
        assert code_revision() == git.stdout.strip()


def point(name: str, kind: str, decode: float, ppl: float) -> frontier.Point:
    p = frontier.Point(name, name.split()[0], kind, 0.25)
    p.ppl = {"ppl": ppl}
    p.speed = {"decode": {"speedup": decode, "speedup_min": decode - 0.01, "speedup_max": decode + 0.01}}
    return p


def test_equal_speed_verdicts() -> None:
    points = [point("dense", "dense", 1.0, 20.0), point("rt25", "routed", 1.1, 40.0), point("rt40", "routed", 1.3, 90.0),
              point("shortgpt 25%", "static", 1.2, 100.0), point("shortgpt 40%", "static", 1.25, 60.0),
              point("laco 40%", "static", 1.5, 500.0)]
    lines = frontier.at_equal_speed(points, "decode")
    assert "rt40" in lines[0] and lines[0].endswith("routing ahead")
    assert lines[1].endswith("static ahead (lower PPL)")
    assert "no routed point" in lines[2]

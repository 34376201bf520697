"""The scoreboard's statistics against hand computations, and its files end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skipgpt.errors import SkipGPTError
from skipgpt.evaluation.scoreboard import (
    bootstrap_average,
    build_scoreboard,
    chance_level,
    paired_bootstrap_difference,
    retained,
    task_accuracy,
    write_scoreboard,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def examples(correct: list[float], n_choices: int | list[int] = 4, start: int = 0) -> dict:
    n = len(correct)
    choices = n_choices if isinstance(n_choices, list) else [n_choices] * n
    return {"doc_ids": list(range(start, start + n)), "correct": list(correct), "n_choices": choices}


def test_chance_level_is_the_mean_over_examples_of_one_over_choices():
    # ARC mixes question sizes: (1/3 + 1/4 + 1/5 + 1/4) / 4 = 62/240
    assert chance_level(examples([1, 0, 1, 0], [3, 4, 5, 4])) == pytest.approx(62 / 240, rel=1e-12)
    assert task_accuracy(examples([1, 0, 1, 1])) == 0.75


def test_retained_above_chance_and_plain_by_hand():
    kept = retained({"boolq": 0.60, "arc_easy": 0.65}, {"boolq": 0.70, "arc_easy": 0.80}, {"boolq": 0.5, "arc_easy": 0.25})
    assert kept["above_chance"]["boolq"] == pytest.approx(0.5, rel=1e-12)  # 0.10 / 0.20
    assert kept["above_chance"]["arc_easy"] == pytest.approx(0.40 / 0.55, rel=1e-12)
    assert kept["plain"]["boolq"] == pytest.approx(0.6 / 0.7, rel=1e-12)
    assert kept["plain"]["arc_easy"] == pytest.approx(0.8125, rel=1e-12)
    assert kept["average_above_chance"] == pytest.approx((0.5 + 0.40 / 0.55) / 2, rel=1e-12)
    assert kept["average_plain"] == pytest.approx((0.6 / 0.7 + 0.8125) / 2, rel=1e-12)
    assert kept["excluded"] == []


def test_retained_leaves_out_a_task_where_dense_is_at_chance():
    kept = retained({"boolq": 0.60, "piqa": 0.55, "extra": 0.9}, {"boolq": 0.70, "piqa": 0.50}, {"boolq": 0.5, "piqa": 0.5})
    assert kept["above_chance"] == {"boolq": pytest.approx(0.5), "piqa": None}
    assert kept["excluded"] == ["piqa"]
    assert kept["average_above_chance"] == pytest.approx(0.5, rel=1e-12)
    # the plain ratio has no chance problem, so piqa stays in it; "extra" has no dense score
    assert kept["average_plain"] == pytest.approx((0.6 / 0.7 + 0.55 / 0.5) / 2, rel=1e-12)


def test_retained_leaves_out_a_task_whose_dense_margin_is_noise():
    """ARC-Challenge on SmolLM2-135M: 27.4 % against 25 % chance, two points of standard error."""
    dense, chance = {"arc_challenge": 0.274, "piqa": 0.648}, {"arc_challenge": 0.25, "piqa": 0.5}
    kept = retained({"arc_challenge": 0.226, "piqa": 0.614}, dense, chance, floor={"arc_challenge": 0.04, "piqa": 0.043})
    assert kept["above_chance"] == {"piqa": pytest.approx(0.114 / 0.148, rel=1e-9), "arc_challenge": None}
    assert kept["excluded"] == ["arc_challenge"] and kept["average_above_chance"] == pytest.approx(0.114 / 0.148, rel=1e-9)
    # without the floor, the 2.4-point margin counts and the row "retains" -100 % of it
    assert retained({"arc_challenge": 0.226}, dense, chance)["above_chance"]["arc_challenge"] == pytest.approx(-1.0, rel=1e-9)


def test_bootstrap_average_interval():
    rng = np.random.default_rng(1)
    data = {"boolq": examples(rng.integers(0, 2, 60).tolist(), 2), "piqa": examples(rng.integers(0, 2, 40).tolist(), 2)}
    mean, low, high = bootstrap_average(data, n_boot=500, seed=3)
    assert mean == pytest.approx((np.mean(data["boolq"]["correct"]) + np.mean(data["piqa"]["correct"])) / 2, rel=1e-12)
    assert low < mean < high
    assert bootstrap_average(data, n_boot=500, seed=3) == (mean, low, high)
    assert bootstrap_average(data, n_boot=500, seed=4) != (mean, low, high)
    assert bootstrap_average({"boolq": examples([1.0] * 30, 2)}, n_boot=200) == (1.0, 1.0, 1.0)


def test_paired_difference_matches_a_loop_over_the_same_draws():
    dense_a = [1.0] * 6 + [0.0] * 4
    row_a = [0.0] * 3 + [1.0] * 3 + [0.0] * 4  # differs on exactly 3 of 10 examples, always for the worse
    same_b = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    row = {"piqa": examples(row_a, 2), "boolq": examples(same_b, 2)}
    dense = {"boolq": examples(same_b, 2), "piqa": examples(dense_a, 2)}
    n_boot, seed = 300, 7
    diff, low, high = paired_bootstrap_difference(row, dense, n_boot=n_boot, seed=seed)
    assert diff == pytest.approx((-0.3 + 0.0) / 2, rel=1e-12)

    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, len(dense[t]["correct"]), size=(n_boot, len(dense[t]["correct"]))) for t in ("boolq", "piqa")}
    replicates = []
    for b in range(n_boot):
        per_task = [np.mean(np.take(row[t]["correct"], draws[t][b])) - np.mean(np.take(dense[t]["correct"], draws[t][b]))
                    for t in ("boolq", "piqa")]
        replicates.append(np.mean(per_task))
    expected = np.percentile(replicates, [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low <= diff <= high <= 0.0  # no example got better


def test_pairing_removes_the_example_variance():
    rng = np.random.default_rng(2)
    data = {"hellaswag": examples(rng.integers(0, 2, 50).tolist()), "boolq": examples(rng.integers(0, 2, 50).tolist(), 2)}
    assert paired_bootstrap_difference(data, data, n_boot=400) == (0.0, 0.0, 0.0)
    _, low, high = bootstrap_average(data, n_boot=400)
    assert high - low > 0.05  # the same data unpaired is far from certain
    all_right = {t: examples([1.0] * 50, e["n_choices"]) for t, e in data.items()}
    all_wrong = {t: examples([0.0] * 50, e["n_choices"]) for t, e in data.items()}
    assert paired_bootstrap_difference(all_right, all_wrong, n_boot=400) == (1.0, 1.0, 1.0)


def test_different_examples_cannot_be_paired():
    with pytest.raises(SkipGPTError, match="different examples.*--sample"):
        paired_bootstrap_difference({"piqa": examples([1, 0, 1], 2, start=5)}, {"piqa": examples([1, 0, 1], 2)})
    with pytest.raises(SkipGPTError, match="only one of the two rows"):
        paired_bootstrap_difference({"piqa": examples([1, 0], 2), "boolq": examples([1, 0], 2)}, {"piqa": examples([1, 0], 2)})


def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    arc_choices = rng.choice([3, 4, 5], size=40, p=[0.1, 0.8, 0.1]).tolist()

    def scored(p: float) -> dict:
        return {
            "boolq": examples((rng.random(40) < p + 0.1).astype(float).tolist(), 2),
            "arc_challenge": examples((rng.random(40) < p - 0.3).astype(float).tolist(), arc_choices),
            "hellaswag": examples((rng.random(40) < p - 0.1).astype(float).tolist(), 4),
        }

    dense = scored(0.7)
    dense["arc_challenge"]["correct"] = [1.0] * 10 + [0.0] * 30  # 25 %, below the 25.4 % chance of these questions
    common = {"budget": "router tuning 4 M tokens", "command": "skipgpt compare", "commit": "abc1234"}
    return [
        {"method": "dense", "label": "Dense", "kind": "dense", "target_ratio": None, "achieved_ratio": None,
         "attn_skipped": None, "mlp_skipped": None, "ratios": {}, "ppl": {"wikitext2": 12.2, "ptb": 20.5},
         "zeroshot_examples": dense, "wall_s": {"eval": 30.0}, **common},
        {"method": "shortgpt", "label": "ShortGPT", "kind": "static", "target_ratio": 0.25, "achieved_ratio": 0.251,
         "attn_skipped": 0.25, "mlp_skipped": 0.25, "ratios": {"wikitext2": 0.251, "ptb": 0.26, "zeroshot": 0.24},
         "ppl": {"wikitext2": 41.9, "ptb": 60.1}, "zeroshot_examples": scored(0.55),
         "wall_s": {"train": 120.0, "eval": 300.0}, **common},
        {"method": "skipgpt-rt", "label": "SkipGPT-RT", "kind": "dynamic", "target_ratio": 0.25, "achieved_ratio": 0.248,
         "attn_skipped": 0.4, "mlp_skipped": 0.1, "ratios": {"wikitext2": 0.248}, "ppl": {"wikitext2": 18.3, "ptb": 30.2},
         "zeroshot_examples": scored(0.65), "wall_s": {"train": 900.0, "eval": 310.0}, **common},
        {"method": "skipgpt-rt", "label": "SkipGPT-RT", "kind": "dynamic + LoRA", "target_ratio": 0.4,
         "achieved_ratio": 0.41, "attn_skipped": None, "mlp_skipped": None, "ratios": {}, "ppl": {"wikitext2": 25.0, "c4": 33.0},
         "zeroshot_examples": {}, "wall_s": {}, **common},
    ]


def test_build_and_write_scoreboard(tmp_path):
    given = rows()
    board = build_scoreboard(given, n_boot=300, seed=1)
    assert all("zeroshot_stats" not in r for r in given)  # the caller's rows are left alone
    assert board["tasks"] == ["boolq", "hellaswag", "arc_challenge"]
    assert board["eval_sets"] == ["wikitext2", "ptb", "c4"]
    assert board["bootstrap"] == {"n": 300, "seed": 1, "alpha": 0.05}
    dense, static, dynamic, no_zeroshot = board["rows"]
    assert no_zeroshot["zeroshot_stats"] is None
    assert dense["zeroshot_stats"]["diff_to_dense"] is None and dense["zeroshot_stats"]["diff_ci95"] is None
    assert dense["zeroshot_stats"]["retained"]["average_above_chance"] == pytest.approx(1.0, rel=1e-12)

    assert dense["zeroshot_stats"]["retained"]["excluded"] == ["arc_challenge"]
    stats = dynamic["zeroshot_stats"]
    arc = stats["tasks"]["arc_challenge"]
    p = task_accuracy(given[2]["zeroshot_examples"]["arc_challenge"])
    assert arc == {"n": 40, "acc": p, "stderr": pytest.approx(np.sqrt(p * (1 - p) / 39), rel=1e-12),
                   "chance": chance_level(given[2]["zeroshot_examples"]["arc_challenge"])}
    assert (stats["diff_to_dense"], *stats["diff_ci95"]) == paired_bootstrap_difference(
        given[2]["zeroshot_examples"], given[0]["zeroshot_examples"], n_boot=300, seed=1)
    assert (stats["average"], *stats["average_ci95"]) == bootstrap_average(given[2]["zeroshot_examples"], n_boot=300, seed=1)
    assert stats["diff_to_dense"] == pytest.approx(stats["average"] - dense["zeroshot_stats"]["average"], abs=1e-12)
    accs = lambda row: {t: s["acc"] for t, s in row["zeroshot_stats"]["tasks"].items()}  # noqa: E731
    chance = {t: s["chance"] for t, s in dense["zeroshot_stats"]["tasks"].items()}
    floor = {t: 2 * s["stderr"] for t, s in dense["zeroshot_stats"]["tasks"].items()}
    assert stats["retained"] == retained(accs(dynamic), accs(dense), chance, floor)

    paths = write_scoreboard(board, tmp_path / "compare.llama", "Llama: methods at 25 %", notes="A seeded subset of 40 examples.")
    assert paths == {k: tmp_path / f"compare.llama.{k}" for k in ("json", "md", "png")}
    assert json.loads(paths["json"].read_text()) == board
    markdown = paths["md"].read_text()
    for label in ("Dense", "ShortGPT", "SkipGPT-RT"):
        assert f"| {label} " in markdown
    assert "A seeded subset of 40 examples." in markdown
    assert "WT2 25.1 / PTB 26.0 / 0-shot 24.0" in markdown
    assert "train 120 s + eval 300 s" in markdown
    for task in board["tasks"]:
        n_chance = pct_text(dense["zeroshot_stats"]["tasks"][task]["chance"])
        assert f"* {task}: n = 40 examples (the same examples for every row), chance {n_chance}" in markdown
    assert "* Left out of retained above chance (dense not above chance by 2 standard errors of its own accuracy): arc_challenge" in markdown
    assert markdown.count("\n|") == len(board["rows"]) + 2  # one table: header, rule, a line per row
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_a_line_through_router_sets_is_named_by_each_of_them():
    from skipgpt.evaluation.scoreboard import _series

    sets = [{"method": "router-set", "kind": "dynamic", "label": f"RT (shipped {p} %)"} for p in (25, 40)]
    lora = [{"method": "router-set, LoRA", "kind": "dynamic + LoRA", "label": "RT (shipped 40 %) + LoRA"}]
    static = [{"method": "shortgpt", "kind": "static", "label": "ShortGPT"}] * 2
    dense, lines = _series({"rows": [*sets, *lora, *static], "dense_row": None})
    assert dense is None
    assert lines == {"RT (shipped 25 %) / RT (shipped 40 %)": sets, "RT (shipped 40 %) + LoRA": lora, "ShortGPT": static}


def pct_text(value: float) -> str:
    return f"{100 * value:.1f} %"


def test_without_a_dense_row_the_comparisons_are_empty(tmp_path):
    board = build_scoreboard(rows()[1:], n_boot=100)
    assert board["dense_row"] is None
    for row in board["rows"][:2]:
        assert row["zeroshot_stats"]["retained"] is None and row["zeroshot_stats"]["diff_to_dense"] is None
    paths = write_scoreboard(board, tmp_path / "nodense", "no reference")
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
    markdown = paths["md"].read_text()
    assert "* boolq: n = 40 examples, chance 50.0 %" in markdown  # nothing checked that the rows share examples


def test_a_row_on_other_examples_is_named_in_the_error():
    given = rows()
    given[1]["zeroshot_examples"]["boolq"]["doc_ids"][0] = 999
    with pytest.raises(SkipGPTError, match="ShortGPT against the dense model: .*different examples"):
        build_scoreboard(given, n_boot=50)

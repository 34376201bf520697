"""The paper-style scoreboard of ``skipgpt compare``: zero-shot accuracy, perplexity and honest statistics.

Every row was scored on the same zero-shot examples, so a row's difference to the dense model is
bootstrapped paired (the same resampled examples for both), which removes the example-to-example
variance that an unpaired comparison of two averages would carry. Accuracy is also reported as the
share of the dense model's margin *above chance* that a row keeps: on a two-choice task 50 % is free,
so a plain ratio ``acc / dense`` flatters any model that has collapsed to guessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import SkipGPTError
from ..files import atomic_write, write_result
from .report import pct, table

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SET_ABBREV = {"wikitext2": "WT2", "ptb": "PTB", "c4": "C4", "zeroshot": "0-shot"}
ALPHA = 0.05  # the scoreboard's intervals are 95 %
# A task counts in "retained above chance" only where the dense model beats chance by this many of its
# own standard errors: SmolLM2-135M scores ARC-Challenge 27.4 % against 25 % chance with a standard
# error of 2.0 points, and a routed row 2.4 points lower then "retains" −100 % of a margin that is noise.
MARGIN_STDERRS = 2.0


def order_tasks(names: Sequence[str]) -> list[str]:
    """The paper's column order, then any other task alphabetically, so tables line up with Tables 1–2."""
    names = set(names)
    return [t for t in PAPER_TASKS if t in names] + sorted(names - set(PAPER_TASKS))


def chance_level(examples: dict[str, Any]) -> float:
    """Per example, not 1/choices of the task: ARC mixes 3-, 4- and 5-choice questions."""
    return float(np.mean(1.0 / np.asarray(examples["n_choices"], dtype=float)))


def task_accuracy(examples: dict[str, Any]) -> float:
    return float(np.mean(np.asarray(examples["correct"], dtype=float)))


def retained(row_acc: dict[str, float], dense_acc: dict[str, float], chance: dict[str, float],
             floor: dict[str, float] | None = None) -> dict[str, Any]:
    """How much of the dense model's accuracy a row keeps, per task and averaged over the tasks both have.

    The above-chance average is the mean of the per-task shares (not a ratio of averages), so each task
    weighs the same whatever its chance level. A task where dense is at or below chance has no margin to
    keep: its share would divide by zero or flip sign, so it is left out of that average and named; so is
    one whose margin is not above ``floor`` (the scoreboard's: :data:`MARGIN_STDERRS` standard errors).
    """
    tasks = order_tasks(set(row_acc) & set(dense_acc))
    above: dict[str, float | None] = {}
    plain: dict[str, float | None] = {}
    excluded = []
    for t in tasks:
        margin = dense_acc[t] - chance[t]
        above[t] = (row_acc[t] - chance[t]) / margin if margin > max(0.0, (floor or {}).get(t, 0.0)) else None
        plain[t] = row_acc[t] / dense_acc[t] if dense_acc[t] > 0 else None
        if above[t] is None:
            excluded.append(t)
    kept_above = [v for v in above.values() if v is not None]
    kept_plain = [v for v in plain.values() if v is not None]
    return {
        "above_chance": above,
        "plain": plain,
        "average_above_chance": float(np.mean(kept_above)) if kept_above else None,
        "average_plain": float(np.mean(kept_plain)) if kept_plain else None,
        "excluded": excluded,
    }


def _interval(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _resampled_average(values_by_task: dict[str, np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """Replicates of the mean of task means, each task resampled on its own (tasks are independent samples).

    Tasks are drawn in the canonical order so the same seed gives the same draws whatever the dict order.
    """
    rng = np.random.default_rng(seed)
    means = []
    for task in order_tasks(list(values_by_task)):
        values = values_by_task[task]
        index = rng.integers(0, len(values), size=(n_boot, len(values)))
        means.append(values[index].mean(axis=1))
    return np.mean(means, axis=0)


def bootstrap_average(
    examples_by_task: dict[str, dict[str, Any]], n_boot: int = 2000, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """Average accuracy over tasks (mean of task means) with its percentile bootstrap interval."""
    correct = {t: np.asarray(e["correct"], dtype=float) for t, e in examples_by_task.items()}
    point = float(np.mean([c.mean() for c in correct.values()]))
    return (point, *_interval(_resampled_average(correct, n_boot, seed), alpha))


def paired_bootstrap_difference(
    row_examples: dict[str, dict[str, Any]],
    dense_examples: dict[str, dict[str, Any]],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> tuple[float, float, float]:
    """Average accuracy of the row minus the dense model's, with a paired percentile interval.

    Resampling the per-example difference resamples the same examples for both models; that is only
    meaningful when both were scored on the same examples in the same order, hence the checks.
    """
    only = sorted(set(row_examples) ^ set(dense_examples))
    if only:
        raise SkipGPTError(
            f"zero-shot task(s) {', '.join(only)} were scored for only one of the two rows being compared; "
            "re-score both with the same --tasks, --sample and seed."
        )
    differences = {}
    for task, row in row_examples.items():
        dense = dense_examples[task]
        if list(row["doc_ids"]) != list(dense["doc_ids"]):
            raise SkipGPTError(
                f"zero-shot task {task}: the rows were scored on different examples (their doc ids differ), so they "
                "cannot be compared pairwise; re-score both with the same --sample and seed."
            )
        differences[task] = np.asarray(row["correct"], dtype=float) - np.asarray(dense["correct"], dtype=float)
    point = float(np.mean([d.mean() for d in differences.values()]))
    return (point, *_interval(_resampled_average(differences, n_boot, seed), alpha))


def _task_stats(examples: dict[str, Any]) -> dict[str, Any]:
    n = len(examples["correct"])
    acc = task_accuracy(examples)
    return {
        "n": n,
        "acc": acc,
        "stderr": float(np.sqrt(acc * (1 - acc) / (n - 1))) if n > 1 else None,
        "chance": chance_level(examples),
    }


def _is_dense_reference(row: dict[str, Any], dense_method: str) -> bool:
    return row.get("kind") == "dense" and row.get("method") == dense_method


def build_scoreboard(rows: list[dict[str, Any]], dense_method: str = "dense", n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Rows with their zero-shot statistics attached (copies; the caller's rows are left alone).

    ``dense_row`` is the reference's index, kept so the table and the figure agree on which row it is.
    """
    dense_row = next((i for i, r in enumerate(rows) if _is_dense_reference(r, dense_method)), None)
    dense = None if dense_row is None else rows[dense_row]
    dense_examples = (dense or {}).get("zeroshot_examples") or {}
    dense_acc = {t: task_accuracy(e) for t, e in dense_examples.items()}
    chance = {t: chance_level(e) for t, e in dense_examples.items()}
    floor = {t: MARGIN_STDERRS * (_task_stats(e)["stderr"] or 0.0) for t, e in dense_examples.items()}
    out, tasks, eval_sets = [], set(), []
    for original in rows:
        row = dict(original)
        examples = row.get("zeroshot_examples") or {}
        tasks |= set(examples)
        eval_sets += [s for s in row.get("ppl") or {} if s not in eval_sets]
        row["zeroshot_stats"] = None
        if examples:
            per_task = {t: _task_stats(examples[t]) for t in order_tasks(list(examples))}
            average, low, high = bootstrap_average(examples, n_boot, seed, ALPHA)
            diff = ci = None
            if dense_examples and original is not dense:
                try:
                    diff, d_low, d_high = paired_bootstrap_difference(examples, dense_examples, n_boot, seed, ALPHA)
                except SkipGPTError as e:
                    raise SkipGPTError(f"{row.get('label', row.get('method'))} against the dense model: {e}") from e
                ci = [d_low, d_high]
            row["zeroshot_stats"] = {
                "tasks": per_task,
                "average": average,
                "average_ci95": [low, high],
                "diff_to_dense": diff,
                "diff_ci95": ci,
                "retained": retained({t: s["acc"] for t, s in per_task.items()}, dense_acc, chance, floor) if dense_acc else None,
            }
        out.append(row)
    return {
        "rows": out,
        "tasks": order_tasks(list(tasks)),
        "eval_sets": eval_sets,
        "bootstrap": {"n": n_boot, "seed": seed, "alpha": ALPHA},
        "dense_row": dense_row,
    }


def _abbrev(name: str) -> str:
    return SET_ABBREV.get(name, name)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _cells(row: dict[str, Any], board: dict[str, Any]) -> list[Any]:
    stats = row.get("zeroshot_stats") or {}
    per_task = stats.get("tasks") or {}
    kept = stats.get("retained") or {}
    ratios = " / ".join(f"{_abbrev(s)} {100 * r:.1f}" for s, r in (row.get("ratios") or {}).items() if r is not None)
    skipped = ""
    if row.get("attn_skipped") is not None or row.get("mlp_skipped") is not None:
        skipped = f"{pct(row.get('attn_skipped')) or '–'} / {pct(row.get('mlp_skipped')) or '–'}"
    average = ""
    if stats:
        low, high = stats["average_ci95"]
        average = f"{100 * stats['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    diff = ""
    if stats.get("diff_to_dense") is not None:
        low, high = stats["diff_ci95"]
        diff = f"{_points(stats['diff_to_dense'])} [{_points(low)}, {_points(high)}]"
    wall = " + ".join(f"{k} {v:.0f} s" for k, v in (row.get("wall_s") or {}).items())
    return [
        row.get("label", row.get("method")),
        row.get("kind"),
        pct(row.get("target_ratio")),
        pct(row.get("achieved_ratio") or 0.0),
        ratios,
        skipped,
        *[(row.get("ppl") or {}).get(s) for s in board["eval_sets"]],
        *[f"{100 * per_task[t]['acc']:.1f}" if t in per_task else "" for t in board["tasks"]],
        average,
        diff,
        pct(kept.get("average_above_chance")),
        pct(kept.get("average_plain")),
        row.get("budget"),
        wall,
    ]


def scoreboard_markdown(board: dict[str, Any], title: str, notes: str = "") -> str:
    """One table a reader can put beside the paper's, with the footnotes needed to trust it."""
    headers = [
        "method", "kind", "target", "achieved", "achieved per set (%)", "attn / MLP skipped",
        *[f"{_abbrev(s)} PPL" for s in board["eval_sets"]],
        *[f"{t} (%)" for t in board["tasks"]],
        "average (%) [95 % CI]", "Δ dense (points) [paired 95 % CI]", "retained above chance", "retained plain",
        "budget", "wall time",
    ]
    parts = [f"# {title}", notes.strip(), table(headers, [_cells(r, board) for r in board["rows"]])]
    dense = None if board.get("dense_row") is None else board["rows"][board["dense_row"]]
    same = " (the same examples for every row)" if dense and dense.get("zeroshot_stats") else ""  # checked when pairing
    lines = []
    for task in board["tasks"]:
        stats = next(r["zeroshot_stats"]["tasks"][task] for r in board["rows"]
                     if r.get("zeroshot_stats") and task in r["zeroshot_stats"]["tasks"])
        lines.append(f"* {task}: n = {stats['n']} examples{same}, chance {pct(stats['chance'])}")
    boot = board["bootstrap"]
    lines.append(
        f"* Intervals: percentile bootstrap, {boot['n']} resamples, seed {boot['seed']}; Δ dense resamples the same "
        "examples for the row and the dense model (paired)."
    )
    lines.append("* Retained above chance: mean over tasks of (acc − chance) / (dense − chance); plain: mean of acc / dense.")
    excluded = sorted({t for r in board["rows"] for t in ((r.get("zeroshot_stats") or {}).get("retained") or {}).get("excluded", [])})
    if excluded:
        lines.append(f"* Left out of retained above chance (dense not above chance by {MARGIN_STDERRS:g} standard errors "
                     f"of its own accuracy): {', '.join(excluded)}")
    parts.append("\n".join(lines))
    return "\n\n".join(p for p in parts if p) + "\n"


def _series(board: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]:
    """The dense reference row and the other rows grouped into lines: one per method, LoRA apart."""
    dense = None if board.get("dense_row") is None else board["rows"][board["dense_row"]]
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for row in board["rows"]:
        if row is not dense:
            groups.setdefault((row.get("method"), "LoRA" in (row.get("kind") or "")), []).append(row)
    named = {}
    for (method, lora), rows in groups.items():
        # One method's rows share a label, except router sets, which each have their own: a
        # line through two of them is named by both, not by the first one's ratio.
        name = " / ".join(dict.fromkeys(str(r.get("label", method)) for r in rows))
        named[f"{name} + LoRA" if lora and "LoRA" not in name else name] = rows
    return dense, named


def _retained_above(row: dict[str, Any]) -> float | None:
    kept = (row.get("zeroshot_stats") or {}).get("retained") or {}
    value = kept.get("average_above_chance")
    return None if value is None else 100 * value


def _wikitext_ppl(row: dict[str, Any]) -> float | None:
    return (row.get("ppl") or {}).get("wikitext2")


def scoreboard_figure(board: dict[str, Any], path: Path | str, title: str) -> None:
    """Accuracy kept and perplexity against compute skipped, the two views of the same trade-off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    dense, groups = _series(board)
    panels = (
        (left, _retained_above, "average accuracy retained above chance (%)"),
        (right, _wikitext_ppl, "WikiText-2 perplexity (log scale)"),
    )
    colors = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    for ax, value, ylabel in panels:
        for name, rows in groups.items():
            points = sorted((100 * (r.get("achieved_ratio") or 0.0), value(r)) for r in rows if value(r) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[name], label=name)
        reference = None if dense is None else value(dense)
        if reference is not None:
            ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"dense ({reference:.4g})")
        ax.set_xlabel("achieved ratio: share of parameters skipped (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.has_data():
            ax.legend(fontsize=8)
    right.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))


def write_scoreboard(board: dict[str, Any], stem: Path | str, title: str, notes: str = "") -> dict[str, Path]:
    """``STEM.json``, ``STEM.md`` and ``STEM.png`` side by side (a stem may hold dots: no suffix logic)."""
    stem = Path(stem)
    write_result(stem, board, scoreboard_markdown(board, title, notes))
    paths = {kind: stem.with_name(f"{stem.name}.{kind}") for kind in ("json", "md", "png")}
    scoreboard_figure(board, paths["png"], title)
    return paths

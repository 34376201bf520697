"""Figures for the analyses in ``skipgpt.evaluation.analysis`` (matplotlib, Agg, no pyplot global state).

Each ``plot_*`` takes the dict its analysis returned, plus a ``context`` line naming the model,
router set and text, and writes a PNG.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MAX_TOKEN_LABELS = 80  # token strings on the axis up to this many tokens, positions beyond
ATTN_COLOR, MLP_COLOR = "#1f77b4", "#ff7f0e"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _titles(fig: Figure, title: str, context: str) -> None:
    lines = [textwrap.fill(line, int(12 * fig.get_figwidth())) for line in context.splitlines()]
    fig.suptitle("\n".join([title, *lines]), fontsize=10)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _token_axis(ax: Any, tokens: list[str]) -> None:
    n = len(tokens)
    if n <= MAX_TOKEN_LABELS:
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7 if n > 30 else 8)
        ax.set_xlabel("token (position order, left to right)")
    else:
        ax.set_xlabel("token position")


def _module_axis(ax: Any, modules: list[str]) -> None:
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels(modules, fontsize=6 if len(modules) > 40 else 8)
    ax.set_ylabel("module (layer, attention / MLP), input side at top")


def _heatmap_size(tokens: int, modules: int) -> tuple[float, float]:
    return max(8.0, min(0.2 * tokens, 24.0) + 3.0), max(5.0, 0.15 * modules + 2.5)


def plot_cosine(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Figure 2: heatmap of cos(x, x + f(x)), modules down, tokens across."""
    cos = np.asarray(result["cosine"]).T  # [2L, T]
    fig = _figure(*_heatmap_size(cos.shape[1], cos.shape[0]))
    ax = fig.add_subplot()
    image = ax.imshow(cos, aspect="auto", cmap="viridis", vmin=min(0.0, float(cos.min())), vmax=1.0, interpolation="nearest")
    _module_axis(ax, result["modules"])
    _token_axis(ax, result["tokens"])
    bar = fig.colorbar(image, ax=ax, fraction=0.04)
    bar.set_label("cosine similarity of module input x and output x + f(x)\n(1 = token unchanged: module redundant for it)")
    _titles(fig, "Token-wise cosine similarity between each module's input and output (every module executing)", context)
    return _save(fig, path)


def plot_routing(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Binary routing map (modules × tokens) over the per-token compute it implies."""
    executed = np.asarray(result["executed"]).T  # [2L, T]
    width, height = _heatmap_size(executed.shape[1], executed.shape[0])
    fig = _figure(width, height + 2.0)
    grid = fig.add_gridspec(2, 1, height_ratios=[4, 1.3])
    ax = fig.add_subplot(grid[0])
    ax.imshow(executed, aspect="auto", cmap=ListedColormap(["#eeeeee", "#1f4e79"]), vmin=0, vmax=1, interpolation="nearest")
    _module_axis(ax, result["modules"])
    ax.tick_params(axis="x", labelbottom=False)
    ax.legend(handles=[Patch(color="#1f4e79", label="executed"), Patch(color="#eeeeee", label="skipped")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    low = fig.add_subplot(grid[1], sharex=ax)
    positions = np.arange(executed.shape[1])
    low.bar(positions, 100 * np.asarray(result["param_fraction_executed"]), color="#7f7f7f", width=0.8,
            label="routable parameters executed")
    low.plot(positions, 100 * np.asarray(result["module_fraction_executed"]), "k.", markersize=4, label="modules executed")
    low.set_ylim(0, 105)
    low.set_ylabel("compute used\nper token (%)")
    low.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _token_axis(low, result["tokens"])
    summary = (f"over these tokens: attention skipped {100 * result['attn_sparsity']:.1f} %, MLP skipped "
               f"{100 * result['mlp_sparsity']:.1f} %, parameters skipped {100 * result['param_ratio']:.1f} %")
    _titles(fig, "Which modules each token executes (argmax routing)", f"{context}\n{summary}")
    return _save(fig, path)


def plot_sparsity_split(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Figure 5: attention and MLP sparsity side by side for each router set, ordered by target."""
    sets = result["router_sets"]
    fig = _figure(max(7.0, 1.3 * len(sets) + 2.5), 5.5)
    ax = fig.add_subplot()
    x = np.arange(len(sets))
    attn = 100 * np.array([s["attn_sparsity"] for s in sets])
    mlp = 100 * np.array([s["mlp_sparsity"] for s in sets])
    for offset, values, color, label in ((-0.2, attn, ATTN_COLOR, "attention skipped"), (0.2, mlp, MLP_COLOR, "MLP skipped")):
        bars = ax.bar(x + offset, values, width=0.4, color=color, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    targets = [s.get("target") for s in sets]
    shown = False
    for i, target in enumerate(targets):
        if target is not None:
            ax.hlines(100 * target, i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1,
                      label=None if shown else "target (share of parameters to skip)")
            shown = True
        if i and targets[i] != targets[i - 1]:
            ax.axvline(i - 0.5, color="#bbbbbb", linewidth=0.8)
    labels = []
    for s in sets:
        target = "no target" if s.get("target") is None else f"T = {100 * s['target']:.0f} %"
        labels.append(f"{s['name']}\n{s['method']}{' + LoRA' if s.get('adapter') else ''}\n{target}\n"
                      f"params skipped {100 * s['param_ratio']:.1f} %")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlabel("router set (ordered by target sparsity T)")
    ax.set_ylabel("share of tokens skipping the module (%)")
    ax.set_ylim(0, max(10.0, float(np.max(np.concatenate([attn, mlp, [100 * t for t in targets if t is not None]]))) * 1.3))
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    _titles(fig, "Attention versus MLP sparsity of router sets (argmax routing)", context)
    return _save(fig, path)


def plot_context_shift(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Figure 6: execute ratio of attention and MLP in a sliding window along the sequence."""
    fig = _figure(9.0, 5.0)
    ax = fig.add_subplot()
    x = np.asarray(result["positions"]) + 1
    for key, color, label in (("attn", ATTN_COLOR, "attention"), ("mlp", MLP_COLOR, "MLP")):
        mean = 100 * np.asarray(result[f"{key}_ratio"])
        std = 100 * np.asarray(result[f"{key}_ratio_std"])
        ax.plot(x, mean, color=color, label=f"{label} (overall {100 * result[f'{key}_ratio_overall']:.1f} %)")
        if result["num_seqs"] > 1:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel(f"context length: position of the last token of the {result['window']}-token window")
    ax.set_ylabel("modules executed in the window (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    band = "; band = ±1 std across sequences" if result["num_seqs"] > 1 else ""
    _titles(fig, f"Attention and MLP activation ratio in a {result['window']}-token sliding window as context grows",
            f"{context}\nmean over {result['num_seqs']} sequence(s) of {result['seq_len']} tokens{band}")
    return _save(fig, path)


def plot_ppl_curve(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Figure 7: perplexity against the share of parameters skipped, one line per method."""
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    methods: dict[str, list[dict[str, Any]]] = {}
    for point in result["points"]:
        methods.setdefault(point["method"], []).append(point)
    dense = [p for name, ps in methods.items() if name == "dense" for p in ps]
    for name, points in methods.items():
        if name == "dense":
            continue
        points = sorted(points, key=lambda p: p["ratio"])
        xs, ys = [100 * p["ratio"] for p in points], [p["ppl"] for p in points]
        line = ax.plot(xs, ys, marker="o", label=name)[0]
        if dense and xs[0] > 0:  # every curve starts at the dense model
            ax.plot([0, xs[0]], [dense[0]["ppl"], ys[0]], color=line.get_color(), linestyle=":", linewidth=1)
        for xv, yv in zip(xs, ys):
            ax.annotate(f"{yv:.1f}", (xv, yv), textcoords="offset points", xytext=(5, -3), fontsize=7, color=line.get_color())
    for p in dense[:1]:
        ax.axhline(p["ppl"], color="k", linestyle="--", linewidth=1, label=f"dense model ({p['ppl']:.1f})")
        ax.plot([0], [p["ppl"]], "ko")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity: share of routable parameters skipped (%)")
    ax.set_ylabel(f"perplexity on {result['dataset']} (log scale)")
    ax.set_xlim(-1, 100 * max(p["ratio"] for p in result["points"]) * 1.15 + 2)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    _titles(fig, "Perplexity versus sparsity", context)
    return _save(fig, path)


def plot_learning_curve(result: dict[str, Any], path: str | Path, context: str) -> Path:
    """Perplexity against the tokens the routers were trained on, one line per series, each point
    labelled with the ratio it skips: where more tuning stops paying."""
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for point in result["points"]:
        series.setdefault(point["series"], []).append(point)
    for name, points in series.items():
        if name == "dense":
            for p in points[:1]:
                ax.axhline(p["ppl"], color="k", linestyle="--", linewidth=1, label=f"dense model ({p['ppl']:.1f})")
            continue
        points = sorted(points, key=lambda p: p["tokens"])
        xs, ys = [p["tokens"] for p in points], [p["ppl"] for p in points]
        line = ax.plot(xs, ys, marker="o", label=name)[0]
        for p in points:
            ax.annotate(f"{p['ppl']:.1f} @ {100 * p['ratio']:.1f} %", (p["tokens"], p["ppl"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens the routers were trained on (log scale)")
    ax.set_ylabel(f"perplexity on {result['dataset']} (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    _titles(fig, "Learning curve of router tuning", context)
    return _save(fig, path)


PLOTS = {
    "cosine": plot_cosine,
    "routing": plot_routing,
    "sparsity-split": plot_sparsity_split,
    "context-shift": plot_context_shift,
    "ppl-curve": plot_ppl_curve,
    "learning-curve": plot_learning_curve,
}

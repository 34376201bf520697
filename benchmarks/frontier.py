"""The measured speed–quality frontier: routing against static pruning at equal measured speed.

    SKIPGPT_DATA_DIR=... python benchmarks/frontier.py                    # the full run: ~2.5 h on 2 CPU cores the first time, ~15 min cached
    python benchmarks/frontier.py --max-windows 8                         # quick perplexity, labelled so in every output
    python benchmarks/frontier.py --quick                                 # smoke run in /tmp (a minute or two)

Points, all on SmolLM2-135M (``--model``):

* dense (HF, no routers);
* routed: the shipped router sets (``--routers``, 25 % and 40 %), and the first of them with its
  threshold re-calibrated to each of ``--recalibrate`` (10 % and 60 %) on calibration text never
  evaluated on (``--calib-text``: WikiText-2 *valid*, as the shipped sets were calibrated, or the
  held-out tail of the C4 sample), with skipgpt.training.calibrate.calibrate_threshold;
* static: each of ``--static`` (ShortGPT, Shortened-LLaMA PPL, LLM-Pruner: the best static rows of
  docs/results/compare_smollm2.md) at each of ``--static-ratios``, pruned with the package's API
  (physically smaller models) on held-out C4 calibration text, as ``skipgpt compare`` does.

x = measured speedup against dense in this run, with benchmarks/speed.py's timing: interleaved
dense/point pairs (A/B, B/A), median of ``--pairs`` pair ratios (bars: min–max), batch 1; panel 1:
``--new-tokens`` greedy decoding steps after a ``--decode-prompt``-token prompt; panel 2: prefill
of ``--prefill-length`` tokens. y = WikiText-2 *test* perplexity by the protocol of ``skipgpt eval``
(skipgpt.evaluation.perplexity, 1,024-token windows, BOS by the tokenizer's convention), over the whole test set unless
``--max-windows`` (then every output says "QUICK"). Each perplexity, calibrated threshold and pruned
model is cached (``--work``), keyed by point and protocol, not by commit, so that a long run
continues in a later sitting (``--no-timing`` computes only these); each value keeps the commit
that measured it, and a rerun only times.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the sibling benchmark: interleaved pair timing)

from skipgpt.baselines import PLAN_NAME, get_method, load_pruned, save_pruned  # noqa: E402
from skipgpt.config import TuneConfig  # noqa: E402
from skipgpt.data import load_source, tokenize, training_sequences  # noqa: E402
from skipgpt.evaluation.perplexity import perplexity  # noqa: E402
from skipgpt.evaluation.report import table  # noqa: E402
from skipgpt.files import write_json, write_text  # noqa: E402
from skipgpt.identity import code_revision  # noqa: E402
from skipgpt.models import load_model  # noqa: E402
from skipgpt.routing.save_load import read_router_config  # noqa: E402
from skipgpt.routing.surgery import detach_routers, has_routers  # noqa: E402
from skipgpt.training.calibrate import calibrate_threshold  # noqa: E402


class Point:
    def __init__(self, name: str, method: str, kind: str, target: float, note: str = "", **extra: Any):
        self.name, self.method, self.kind, self.target, self.note = name, method, kind, target, note
        self.weights = self.config = self.threshold = self.model = None
        self.achieved: float | None = 0.0 if kind == "dense" else None
        self.__dict__.update(extra)
        self.ppl: dict[str, Any] | None = None
        self.speed: dict[str, dict[str, Any]] = {}

    def apply(self, model: torch.nn.Module) -> None:
        speed.routed_apply(self.weights, self.config, self.threshold, "keep")(model)


class Cache:
    """A JSON file of finished results (perplexities, thresholds), keyed by what made them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_json(self.path, self.data)


def calibration_ids(args: argparse.Namespace, tokenizer: Any, spec: str, sequences: int, length: int) -> tuple[torch.Tensor, str]:
    """Calibration text never evaluated on: WikiText-2 valid (its first tokens) or the held-out tail of C4."""
    if spec == "c4":
        _, ids = training_sequences(tokenizer, load_source("c4", "train").documents, TuneConfig().seq_len, sequences, length)
        return ids, f"{sequences} x {length} held-out tokens of the C4 sample"
    ids = tokenize(tokenizer, load_source(spec, "valid").text())[: sequences * length]
    return ids.view(sequences, length), f"the first {sequences} x {length} tokens of {spec} valid"


def routed_points(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace, cache: Cache, commit: str) -> list[Point]:
    points = []
    sets = [r for r in args.routers.split(",") if r]
    for name in sets:
        training = read_router_config(name).get("training", {})
        weights, config = speed.read_set(model, name)
        points.append(Point(f"skipgpt {training.get('target', 0):.0%} (shipped {name})", "skipgpt-rt", "routed", training.get("target"),
                            f"shipped set {name}", weights=weights, config=config, threshold=config.threshold, shipped=True))
    if not sets or not args.recalibrate:
        return points
    source = sets[0]
    weights, config = speed.read_set(model, source)
    unit = read_router_config(source).get("training", {}).get("target_unit", "params")
    calib, note = None, ""
    for target in args.recalibrate:
        key = f"threshold|{source}|{target}|{unit}|{args.calib_text}|{args.calib_tokens}"
        found = cache.get(key)
        if found is None:
            if calib is None:
                calib, note = calibration_ids(args, tokenizer, args.calib_text, *args.calib_tokens)
            speed.routed_apply(weights, config, config.threshold, "keep")(model)
            try:
                print(f"[frontier] calibrating {source} to {target:.0%} on {note}", file=sys.stderr, flush=True)
                found = {**calibrate_threshold(model, calib, target, unit), "calibration_text": note, "commit": commit}
            finally:
                detach_routers(model)
            cache.put(key, found)
        points.append(Point(f"skipgpt {target:.0%} ({Path(source).name} re-calibrated)", "skipgpt-rt", "routed", target,
                            f"{source}, threshold {found['threshold']:.4g} for {target:.0%} on {found['calibration_text']}",
                            weights=weights, config=config, threshold=found["threshold"], shipped=False, calibration=found))
    return sorted(points, key=lambda p: p.target or 0.0)


def static_points(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace, commit: str) -> list[Point]:
    points, calib = [], None
    for method in args.static:
        for ratio in args.static_ratios:
            folder = Path(args.work) / "pruned" / f"{method}_{ratio:g}_{args.static_calib[0]}x{args.static_calib[1]}"
            pruned = copy.deepcopy(model)
            if (folder / PLAN_NAME).is_file():
                plan = load_pruned(pruned, folder)
            else:
                if calib is None:
                    calib, _ = calibration_ids(args, tokenizer, "c4", *args.static_calib)
                print(f"[frontier] pruning: {method} at {ratio:.0%}", file=sys.stderr, flush=True)
                plan = get_method(method).prune(pruned, calib, ratio)
                save_pruned(pruned, plan, folder)
            pruned.eval()
            points.append(Point(f"{method} {ratio:.0%}", method, "static", ratio, f"{len(plan.removed)} modules removed" if plan.removed
                                else "width pruned", model=pruned, achieved=plan.achieved_ratio, plan_dir=str(folder)))
    return points


def evaluate(model: torch.nn.Module, tokenizer: Any, points: list[Point], args: argparse.Namespace, cache: Cache, commit: str) -> None:
    text = load_source("wikitext2", "test").text()
    windows = "all" if args.max_windows is None else args.max_windows
    done: list[float] = []
    for i, p in enumerate(points):
        made = f"threshold {p.threshold:.6g}" if p.threshold is not None else getattr(p, "plan_dir", "")  # what the point is
        # Not keyed by commit, so that a long run continues in the next sitting; the commit that
        # measured each value is kept with it and reported.
        key = f"ppl|{p.name}|{made}|wikitext2-test|seq{args.seq_len}|windows-{windows}"
        p.ppl = cache.get(key)
        if p.ppl is not None:
            continue
        target = p.model if p.model is not None else model
        if p.kind == "routed":
            p.apply(target)
        try:
            r = perplexity(target, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows, desc=f"[{i + 1}/{len(points)}] PPL {p.name}")
        finally:
            if has_routers(target):
                detach_routers(target)
        s = r.get("sparsity") or {}
        p.ppl = {"ppl": r["ppl"], "windows": r["windows"], "scored_tokens": r["scored_tokens"], "wall_s": round(r["wall_s"], 1),
                 "param_ratio": s.get("param_ratio"), "attn_skip": s.get("attn_sparsity"), "mlp_skip": s.get("mlp_sparsity"),
                 "commit": commit}
        cache.put(key, p.ppl)
        done.append(r["wall_s"])
        print(f"[frontier] perplexity {i + 1}/{len(points)} in {r['wall_s']:.0f} s; about "
              f"{sum(done) / len(done) * (len(points) - i - 1) / 60:.0f} min of perplexity left", file=sys.stderr, flush=True)
    for p in points:
        if p.kind == "routed":
            p.achieved = p.ppl["param_ratio"]


def time_points(model: torch.nn.Module, points: list[Point], args: argparse.Namespace) -> None:
    """Both panels, every point against dense in interleaved pairs (speed.bench_cell)."""
    configs = [speed.Config("HF dense", "none")]
    for p in points[1:]:
        configs.append(speed.Config(p.name, p.kind, apply=p.apply if p.kind == "routed" else None, model=p.model))
    cells = {"decode": (args.decode_prompt, args.new_tokens), "prefill": (args.prefill_length, 0)}
    runs = len(configs) + 2 * args.pairs * (len(configs) - 1)
    bar, progress = speed.progress_bar(sum(runs * speed.run_weight(1, n, t) for n, t in cells.values()), "timing")
    for panel, (length, new_tokens) in cells.items():
        targs = argparse.Namespace(**{**vars(args), "new_tokens": new_tokens, "shape": None})
        rows = speed.bench_cell(model, configs, speed.prompt_ids(model, targs, 1, length), targs, progress)
        for p, row in zip(points, rows):
            keys = ("speedup", "speedup_min", "speedup_max", "speedup_q1", "speedup_q3", "speedup_best", "speedup_ratios", "ideal",
                    "tokens_per_s")
            p.speed[panel] = {"prompt": length, "new_tokens": new_tokens, "pairs": row["pairs"],
                              **{k: row[f"{panel}_{k}"] for k in keys}}
            if p.kind == "static" and get_method(p.method).granularity != "layer":  # the config keeps the base shapes
                p.speed[panel]["ideal"] = None
    bar.close()


def at_equal_speed(points: list[Point], panel: str) -> list[str]:
    """Each static point against the routed points (dense included) at least as fast as it (by the
    median): routing is ahead where one of them has a lower perplexity. No interpolation: a noisy
    curve need not be monotonic. Ranges are the pair ratios' min–max."""
    def show(p: Point) -> str:
        s = p.speed[panel]
        span = "" if p.kind == "dense" else f" [{s['speedup_min']:.2f}–{s['speedup_max']:.2f}]"
        return f"{p.name} ({s['speedup']:.2f} ×{span}, PPL {p.ppl['ppl']:.1f})"

    routed = [p for p in points if p.kind in ("dense", "routed")]
    lines = []
    for p in (q for q in points if q.kind == "static"):
        faster = [q for q in routed if q.speed[panel]["speedup"] >= p.speed[panel]["speedup"]]
        best = min(faster, key=lambda q: q.ppl["ppl"], default=None)
        if best is None:
            lines.append(f"{show(p)}: no routed point is this fast: static ahead")
        else:
            verdict = "routing ahead" if best.ppl["ppl"] < p.ppl["ppl"] else "static ahead (lower PPL)"
            lines.append(f"{show(p)}: best routed point at least as fast: {show(best)}: {verdict}")
    return lines


def plot(points: list[Point], path: Path, title: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"decode": f"batch-1 decoding: {args.new_tokens} tokens after a {args.decode_prompt}-token prompt",
              "prefill": f"batch-1 prefill of {args.prefill_length} tokens"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault("skipgpt routed" if p.kind in ("dense", "routed") else p.method, []).append(p)
    styles = {group: (marker, f"C{i}") for i, (group, marker) in enumerate(zip(groups, "osD^vP*Xh"))}
    for ax, (panel, label) in zip(axes, panels.items()):
        for group, members in groups.items():
            marker, color = styles[group]
            members = sorted(members, key=lambda q: q.achieved or 0.0)
            xs = [q.speed[panel]["speedup"] for q in members]
            ys = [q.ppl["ppl"] for q in members]
            err = [[x - q.speed[panel]["speedup_min"] if q.speed[panel]["speedup_min"] else 0.0 for x, q in zip(xs, members)],
                   [q.speed[panel]["speedup_max"] - x if q.speed[panel]["speedup_max"] else 0.0 for x, q in zip(xs, members)]]
            ax.errorbar(xs, ys, xerr=err, marker=marker, color=color, capsize=3, label=group)
            for x, y, q in zip(xs, ys, members):
                shipped = getattr(q, "shipped", False)
                if shipped:
                    ax.plot([x], [y], marker=marker, markersize=12, markerfacecolor="none", color=color)
                text = "dense" if q.kind == "dense" else f"{q.achieved:.0%}" + (" shipped" if shipped else "")
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="measured speedup over dense (median of pairs; bars: min–max)", title=label, yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("WikiText-2 test perplexity")
    axes[1].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(points: list[Point], args: argparse.Namespace, commit: str, started: float) -> None:
    windows = "whole WikiText-2 test set" if args.max_windows is None else f"QUICK RUN: first {args.max_windows} windows of WikiText-2 test only"
    device = f"CPU ({torch.get_num_threads()} torch threads)" if args.device == "cpu" else torch.cuda.get_device_name()
    title = (f"{args.model}, {args.dtype}, {device}, commit {commit}: speed–quality frontier; PPL on the {windows} "
             f"(seq-len {args.seq_len}); speedup = median of {args.pairs} interleaved pairs against dense")
    out = Path(args.out)
    plot(points, out.with_suffix(".png"), title, args)

    def sp(p: Point, panel: str) -> str:
        s = p.speed[panel]
        return "1.00" if p.kind == "dense" else f"{s['speedup']:.2f} [{s['speedup_min']:.2f}–{s['speedup_max']:.2f}]"

    headers = ["point", "kind", "target", "achieved ratio", "WT2 PPL", "decode × dense [min–max]", "ideal", "prefill × dense [min–max]", "ideal", "note"]
    lines = [(p.name, p.kind, f"{p.target:.0%}" if p.target else "-", f"{p.achieved:.1%}" if p.achieved is not None else "-",
              f"{p.ppl['ppl']:.2f}", sp(p, "decode"), speed._f(p.speed["decode"]["ideal"]), sp(p, "prefill"),
              speed._f(p.speed["prefill"]["ideal"]), p.note) for p in points]
    equal = {panel: at_equal_speed(points, panel) for panel in ("decode", "prefill")}
    text = (f"# {title}\n\n" + table(headers, lines) + "\n\nIdeal: dense FLOPs / executed FLOPs (routed: from its decisions; static: "
            "from the pruned config: whole layers only).\n"
            + "".join(f"\n## At equal measured speed: {panel}\n\n" + "".join(f"* {line}\n" for line in equal[panel]) for panel in equal))
    print(text)
    write_text(out.with_suffix(".md"), text)
    write_json(out.with_suffix(".json"), {
        "title": title, "commit": commit, "quick": args.max_windows is not None, "device": device, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.time() - started, 1),
        "args": {k: v for k, v in vars(args).items()}, "at_equal_speed": equal,
        "points": [{"name": p.name, "method": p.method, "kind": p.kind, "target": p.target, "achieved_ratio": p.achieved, "note": p.note,
                    "shipped": getattr(p, "shipped", None), "threshold": p.threshold, "calibration": getattr(p, "calibration", None),
                    "plan_dir": getattr(p, "plan_dir", None), "wikitext2_test": p.ppl, "speed": p.speed} for p in points]})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=speed.DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--routers", default=speed.DEFAULT_ROUTERS, help="shipped/trained router sets; the first is re-calibrated")
    p.add_argument("--recalibrate", default="0.10,0.60", help="targets the first router set is re-calibrated to ('' for none)")
    p.add_argument("--calib-text", default="wikitext2", choices=["wikitext2", "c4"], help="re-calibration text (wikitext2: its valid split)")
    p.add_argument("--calib-tokens", default="4x1024", help="re-calibration sequences x length (skipgpt calibrate's default)")
    p.add_argument("--static", default="shortgpt,shortened-ppl,llm-pruner", help="static methods ('' for none)")
    p.add_argument("--static-ratios", default="0.25,0.40")
    p.add_argument("--static-calib", default="8x512", help="static pruning calibration: sequences x length of held-out C4 (skipgpt compare's)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-length", type=int, default=1024)
    p.add_argument("--min-prefill-s", type=float, default=1.0, help="repeat shorter prefills within a run to last this long")
    p.add_argument("--text", default="wikitext2", help="prompt text for timing (its --text-split)")
    p.add_argument("--text-split", default="valid")
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity on the first N windows only: a QUICK run, labelled so")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/frontier", help="cache of perplexities, thresholds and pruned models")
    p.add_argument("--out", default=None, help="output stem: STEM.png, .json, .md (default: docs/results/frontier_smollm2; "
                                              "runs/frontier/frontier_smollm2_quick with --max-windows)")
    p.add_argument("--no-timing", action="store_true", help="only compute and cache what is slow and stable (perplexities, "
                                                               "thresholds, pruned models); time and report in a later run")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny calibration, 1 window of 128 tokens, 1 pair, out in /tmp")
    if p.parse_args(argv).quick:  # new defaults; flags given still win
        p.set_defaults(max_windows=1, seq_len=128, pairs=1, new_tokens=2, decode_prompt=16, prefill_length=32, calib_tokens="1x128",
                       static_calib="2x64", min_prefill_s=0.0, work="/tmp/skipgpt_frontier_quick_work", out="/tmp/skipgpt_frontier_quick")
    args = p.parse_args(argv)
    args.out = args.out or ("docs/results/frontier_smollm2" if args.max_windows is None else "runs/frontier/frontier_smollm2_quick")
    args.recalibrate = [float(r) for r in args.recalibrate.split(",") if r]
    args.static = [m for m in args.static.split(",") if m]
    args.static_ratios = [float(r) for r in args.static_ratios.split(",") if r]
    args.calib_tokens = [int(v) for v in args.calib_tokens.split("x")]
    args.static_calib = [int(v) for v in args.static_calib.split("x")]
    return args


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = code_revision()
    cache = Cache(Path(args.work) / "cache.json")
    model, tokenizer = load_model(args.model, dtype=speed.DTYPES[args.dtype], device=args.device)
    points = [Point("dense", "dense", "dense", 0.0, "HF model, no routers")]
    points += routed_points(model, tokenizer, args, cache, commit)
    points += static_points(model, tokenizer, args, commit)
    evaluate(model, tokenizer, points, args, cache, commit)
    if args.no_timing:  # the cached part only: perplexities, thresholds, pruned models
        print(f"[frontier] perplexities cached in {cache.path}; run again without --no-timing to time and report", file=sys.stderr)
        return
    time_points(model, points, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report(points, args, commit, started)


if __name__ == "__main__":
    main()

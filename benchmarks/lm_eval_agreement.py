"""Does lm-evaluation-harness, run by its own CLI on an exported directory, score the routed model?

    python benchmarks/lm_eval_agreement.py                      # SmolLM2 + the shipped 25 % set, PIQA's first 200
    python benchmarks/lm_eval_agreement.py --routers smollm2-135m-rt40 --task arc_easy --limit 100

Exports the model with its routers (``skipgpt export``), runs ``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`` in a subprocess exactly as a user would (the local task
files reach it through ``--include_path``, as ``skipgpt eval --tasks`` feeds them), then runs
``skipgpt eval --tasks`` on the same examples, and compares accuracy and every example's
log-likelihoods and predicted choice. A dense row (the export loaded without
``trust_remote_code``) shows what a user silently measured before. Writes a JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from skipgpt.evaluation.report import table
from skipgpt.evaluation.zeroshot import evaluate_tasks
from skipgpt.evaluation.zeroshot_tasks import PAPER_METRICS, cache_root, find_task_files, prepare_task_data, task_config
from skipgpt.files import write_result
from skipgpt.identity import code_revision
from skipgpt.inference.export import export_model
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers


def lm_eval_cli(model_args: str, task: str, limit: int, batch_size: int, yaml_dir: Path, out: Path) -> dict:
    """lm-eval's own CLI: per-example log-likelihoods (doc order) and the task's scores."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", task,
               "--include_path", str(yaml_dir), "--limit", str(limit), "--batch_size", str(batch_size),
               "--log_samples", "--output_path", str(out), "--device", "cpu"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {"scores": {k.split(",")[0]: v for k, v in results.items() if "," in k}, "loglikelihoods": lls, "wall_s": round(wall, 1),
            "command": " ".join(command)}


def compare(a: list[list[float]], b: list[list[float]]) -> dict:
    picks = [max(range(len(x)), key=x.__getitem__) for x in a], [max(range(len(x)), key=x.__getitem__) for x in b]
    return {"examples": len(a), "same_prediction": sum(p == q for p, q in zip(*picks)),
            "max_abs_loglikelihood_difference": max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", default="smollm2-135m-rt25")
    p.add_argument("--task", default="piqa")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="docs/results/lm_eval_agreement_smollm2_rt25")
    args = p.parse_args()
    metric = PAPER_METRICS[args.task]
    commit = code_revision()

    with tempfile.TemporaryDirectory(prefix="lm-eval-agreement-") as tmp:
        work = Path(tmp)
        exported = export_model(args.model, work / "exported", routers=args.routers, dtype="float32")
        present, _ = find_task_files([args.task], args.data_dir)
        cache = cache_root(None)
        data = prepare_task_data(args.task, present[args.task], cache)
        (work / "tasks").mkdir()
        (work / "tasks" / f"{args.task}.yaml").write_text(yaml.safe_dump(task_config(args.task, data, cache / "hf_datasets"), sort_keys=False))

        rows = {}
        rows["lm-eval hf, exported dir, trust_remote_code=True"] = lm_eval_cli(
            f"pretrained={exported},trust_remote_code=True,dtype=float32", args.task, args.limit, args.batch_size, work / "tasks", work / "routed")
        rows["lm-eval hf, exported dir, plain (dense)"] = lm_eval_cli(
            f"pretrained={exported},dtype=float32", args.task, args.limit, args.batch_size, work / "tasks", work / "dense")
        for label, model_dir, routers in (("skipgpt eval --tasks, base + router set", args.model, args.routers),
                                          ("skipgpt eval --tasks, exported dir", str(exported), None)):
            model, tokenizer = load_model(model_dir)
            if routers:
                load_routers(model, routers)
            start = time.perf_counter()
            res = evaluate_tasks(model, tokenizer, [args.task], limit=args.limit, data_dir=args.data_dir,
                                 batch_size=args.batch_size, loglikelihoods=True)[args.task]
            rows[label] = {"scores": res["metrics"], "loglikelihoods": res["loglikelihoods"], "sparsity": res["sparsity"],
                           "wall_s": round(time.perf_counter() - start, 1)}

    reference = rows["skipgpt eval --tasks, base + router set"]
    for row in rows.values():
        row["agreement_with_skipgpt_eval"] = compare(row["loglikelihoods"], reference["loglikelihoods"])
    result = {"model": args.model, "routers": args.routers, "task": args.task, "limit": args.limit, "metric": metric,
              "batch_size": args.batch_size, "commit": commit,
              "rows": {k: {kk: vv for kk, vv in v.items() if kk != "loglikelihoods"} for k, v in rows.items()}}
    header = ["run", metric, "same prediction as skipgpt eval", "max |Δ log-likelihood|", "skipped (param ratio)", "wall"]
    lines = [[label, f"{100 * row['scores'][metric]:.1f}",
              f"{row['agreement_with_skipgpt_eval']['same_prediction']} / {row['agreement_with_skipgpt_eval']['examples']}",
              f"{row['agreement_with_skipgpt_eval']['max_abs_loglikelihood_difference']:.2e}",
              f"{100 * row['sparsity']['param_ratio']:.1f} %" if row.get("sparsity") else "", f"{row['wall_s']:.0f} s"]
             for label, row in rows.items()]
    text = table(header, lines)
    print(text)
    write_result(args.out, result,
        f"# lm-eval on an exported routed model vs `skipgpt eval --tasks`\n\n{args.model} + `{args.routers}`, {args.task} "
        f"first {args.limit} examples, batch {args.batch_size}, float32, CPU; commit {commit}; "
        f"`python benchmarks/lm_eval_agreement.py`.\n\n{text}\n")


if __name__ == "__main__":
    main()

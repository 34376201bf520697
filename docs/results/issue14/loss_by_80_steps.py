"""Training loss (KL + sparsity term), means of 80 steps, of tune runs' train_log.jsonl.

Usage: python loss_by_80_steps.py OUT.json NAME=RUN_DIR...
"""
import json
import sys

out, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
res = {}
for name, d in pairs:
    rows = [json.loads(line) for line in open(f"{d}/train_log.jsonl")]
    res[name] = {f"{s}-{min(s + 80, len(rows)) - 1}": round(sum(r["loss"] for r in rows[s:s + 80]) / len(rows[s:s + 80]), 3)
                 for s in range(0, len(rows), 80)}
    print(name, list(res[name].values()))
json.dump(res, open(out, "w"), indent=1)

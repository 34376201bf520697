"""How long each micro-batch of a `tune --budget-minutes` run takes, the probe's and the first
training steps', from the start of one loss call to the start of the next.

    python docs/results/budget_probe/probe_profile.py OUT.json [tune options...]

Runs `skipgpt tune` in this process with the loss wrapped, so the numbers are those of the real
command (replacement fit, probe, training, calibration), not of a re-implementation."""
from __future__ import annotations

import json
import sys
import tempfile
import time

import skipgpt.training.tune as tune
from skipgpt.cli import main

out, options = sys.argv[1], sys.argv[2:]
starts: list[float] = []
real = tune.routed_loss


def timed(*args, **kwargs):
    starts.append(time.perf_counter())
    return real(*args, **kwargs)


tune.routed_loss = timed
with tempfile.TemporaryDirectory() as tmp:
    main(["tune", *options, "--out", f"{tmp}/routers"])
    results = json.load(open(f"{tmp}/routers/results.json"))
gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
probe = len(results["budget"]["probe_micro_batch_s"])
record = {"options": options, "probe_micro_batches": probe, "budget": results["budget"],
          "probe_gaps_s": gaps[:probe - 1], "training_gaps_s": gaps[probe:],
          "note": "gap i = start of loss call i+1 - start of call i; the gap after the probe's last call "
                  "(sizing, optimizer set-up) is left out"}
json.dump(record, open(out, "w"), indent=1)
print(json.dumps(record, indent=1))

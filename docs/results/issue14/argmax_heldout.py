"""Argmax ratio before calibration (threshold 0) of 70-step router sets on C4 text they never
trained on, against the sequences they did train on and the 4,096-token tail `tune` calibrates on.

The earlier script beside this one sampled 64 "training" sequences at random from the training
split, most of which a 70-step run never reads (it reads 280 of them): this one separates the two.
Usage: SKIPGPT_DATA_DIR=... python argmax_heldout.py OUT.json RUN_DIR...
"""
import json
import sys

import torch

from skipgpt.data import load_source, training_sequences
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers
from skipgpt.routing.surgery import detach_routers, has_routers, routing_state
from skipgpt.training.calibrate import achieved_ratio
from skipgpt.training.loop import batch_indices

out, runs = sys.argv[1], sys.argv[2:]
model, tok = load_model("smollm2-135m")
src = load_source("c4", "train", None)
train, tail = training_sequences(tok, src.documents, 256, 4, 1024)
n = train.shape[0]
res = {"training_sequences": n, "runs": {}}
for d in runs:
    cfg = json.load(open(f"{d}/results.json"))["tune"]
    assert cfg["grad_accum"] == 1
    seen = torch.cat([batch_indices(s, 0, n=n, batch_size=cfg["batch_size"], grad_accum=1, rank=0, world=1, seed=cfg["seed"])
                      for s in range(cfg["steps"])]).unique()
    unseen = torch.tensor(sorted(set(range(n)) - set(seen.tolist())))
    g = torch.Generator().manual_seed(0)
    pick_unseen = unseen[torch.randperm(len(unseen), generator=g)[:128]]
    pick_seen = seen[torch.randperm(len(seen), generator=g)[:64]]
    if has_routers(model):
        detach_routers(model)
    load_routers(model, d)
    routing_state(model).config.threshold = 0.0
    res["runs"][d] = {
        "target": cfg["target"], "steps": cfg["steps"], "sequences_trained_on": len(seen),
        "trained_on_64x256": round(achieved_ratio(model, train[pick_seen], "params", batch_size=8), 4),
        "never_trained_on_128x256": round(achieved_ratio(model, train[pick_unseen], "params", batch_size=8), 4),
        "calibration_tail_4x1024": round(achieved_ratio(model, tail, "params"), 4),
    }
    print(d, res["runs"][d], flush=True)
json.dump(res, open(out, "w"), indent=1)

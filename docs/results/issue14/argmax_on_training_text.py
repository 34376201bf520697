"""Argmax ratio (threshold 0, i.e. before calibration) of router sets on the training text and on the held-out C4 tail.

Usage: SKIPGPT_DATA_DIR=... python argmax_on_training_text.py RUN_DIR... (writes the JSON to /work/runs/argmax_train.json; edit the paths for your machine)."""
import sys, json, torch
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers
from skipgpt.routing.surgery import routing_state, detach_routers, has_routers
from skipgpt.data import load_source, training_sequences
from skipgpt.training.calibrate import achieved_ratio
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
src = load_source("c4", "train", "/work/shared/data")
train, calib = training_sequences(tok, src.documents, 256, 4, 1024)
g = torch.Generator().manual_seed(0)
sample = train[torch.randperm(train.shape[0], generator=g)[:64]]
res = {}
for d in sys.argv[1:]:
    if has_routers(model):
        detach_routers(model)
    load_routers(model, d)
    routing_state(model).config.threshold = 0.0
    res[d] = {"train_64x256": round(achieved_ratio(model, sample, "params", batch_size=8), 4),
              "heldout_4x1024": round(achieved_ratio(model, calib, "params"), 4)}
    print(d, res[d], flush=True)
json.dump(res, open("/work/runs/argmax_train.json", "w"), indent=1)

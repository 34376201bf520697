"""Which half of the collapsed one-hour 4e-3 set broke, its routers or its replacements? Swap each
half with the shipped set's (or re-fit the replacements by ridge regression, as `tune` does before
training) and score the first 8 WikiText-2 test windows. The threshold stays the collapsed set's
(re-set for 26 % on WT2 valid), so the ratio moves with each swap. Output: swap_routers_replacements.txt.

Usage: SKIPGPT_DATA_DIR=... python swap_routers_replacements.py COLLAPSED_DIR
"""
import sys

import torch

from skipgpt.data import load_source, training_sequences
from skipgpt.evaluation.perplexity import perplexity
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers, load_routers_state_dict, read_router_weights
from skipgpt.training.replacements import fit_replacements

torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
text = load_source("wikitext2", "test").text()


def ev(tag: str) -> None:
    r = perplexity(model, tok, text, max_windows=8, progress=False)
    print(tag, round(r["ppl"], 2), {k: v for k, v in r["sparsity"].items() if k != "per_layer"}, flush=True)


collapsed, shipped = sys.argv[1], "smollm2-135m-rt25"
load_routers(model, collapsed)
ev("collapsed")
a, b = read_router_weights(collapsed), read_router_weights(shipped)
load_routers_state_dict(model, {k: (b[k] if ".replacement." in k else a[k]) for k in a})
ev("collapsed routers + shipped replacements")
train_ids, _ = training_sequences(tok, load_source("c4", "train").documents, 256, 4, 1024)
fit_replacements(model, train_ids[:32])
ev("collapsed routers + freshly fitted replacements")
load_routers_state_dict(model, {k: (a[k] if ".replacement." in k else b[k]) for k in a})
ev("shipped routers + collapsed replacements")

"""How far training moved the routers' decision weights: the norm of (execute row − skip row) of
each router's weight matrix (root mean square over the 60 routers), and the mean execute-minus-skip
bias, per router set. nn.Linear's default start has an expected norm of sqrt(2 · 576 / 3) / sqrt(576)
= 0.816 and the bias starts at +3 (`init_bias`).

Usage: python router_weight_walk.py OUT.json NAME=ROUTER_DIR...
"""
import json
import sys

from safetensors.torch import load_file

out, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
res = {"start (expected)": {"weight_norm": round((2 / 3) ** 0.5, 3), "bias": 3.0}}
for name, d in pairs:
    w = load_file(f"{d}/routers.safetensors")
    norms = [(w[k][1] - w[k][0]).norm().item() for k in w if k.endswith("net.weight")]
    bias = [(w[k][1] - w[k][0]).item() for k in w if k.endswith("net.bias")]
    res[name] = {"weight_norm": round((sum(x * x for x in norms) / len(norms)) ** 0.5, 3),
                 "bias": round(sum(bias) / len(bias), 3)}
for k, v in res.items():
    print(f"{k:60s} {v}")
json.dump(res, open(out, "w"), indent=1)

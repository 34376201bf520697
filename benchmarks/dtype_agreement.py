"""Does a bf16 (or fp16) model skip what the same model in float32 skips, at the same quality?

    python benchmarks/dtype_agreement.py                          # SmolLM2 + the shipped 25 % set, whole WikiText-2 test
    python benchmarks/dtype_agreement.py --max-windows 24 --dtype float16

Routers keep float32 weights and decide in float32 whatever the model's dtype, so the decisions
can differ only where the hidden states they read differ: bf16 rounding moves a router's margin,
and a token near the threshold flips. This runs the float32 and the half-precision model over the
same windows (argmax routing, the skipping engine), compares every (token, module) decision, and
reports the share that agree, the flips by direction and module kind, and both perplexities.
Writes a JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from skipgpt.data import bos_token, load_source, tokenize
from skipgpt.evaluation.perplexity import windows_of
from skipgpt.evaluation.report import table
from skipgpt.files import write_json
from skipgpt.identity import code_revision
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers
from skipgpt.routing.surgery import gate_mode, routing_state


def routed(args: argparse.Namespace, dtype: str) -> torch.nn.Module:
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    load_routers(model, args.routers)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", default="smollm2-135m-rt25")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=0, help="0: the whole test set")
    p.add_argument("--out", default=None, help="default: docs/results/dtype_agreement_<dtype>_<routers>")
    args = p.parse_args()
    out = Path(args.out or f"docs/results/dtype_agreement_{args.dtype}_{args.routers}")

    _, tokenizer = load_model(args.model)
    windows = windows_of(tokenize(tokenizer, load_source(args.data, "test", args.data_dir).text()), args.seq_len,
                         args.max_windows or None, bos_token(tokenizer))
    models = {"float32": routed(args, "float32"), args.dtype: routed(args, args.dtype)}
    nll = {name: 0.0 for name in models}
    agree = torch.zeros(2, dtype=torch.float64)  # attention, MLP
    flips = {"to_skip": torch.zeros(2, dtype=torch.float64), "to_execute": torch.zeros(2, dtype=torch.float64)}
    skipped = {name: 0.0 for name in models}
    pairs_per_kind, scored = 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for window in tqdm(windows.split(1), desc=f"float32 vs {args.dtype}", unit="window"):
            window = window.to(args.device)
            gates = {}
            for name, model in models.items():
                with gate_mode(model, "argmax"):
                    logits = model(input_ids=window, use_cache=False).logits[:, :-1].float()
                nll[name] += float(F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum"))
                gates[name] = routing_state(model).stacked_gates().cpu().bool()  # [2L, 1, T]
                skipped[name] += float((~gates[name]).sum())
            full, half = gates["float32"], gates[args.dtype]
            for kind in range(2):
                agree[kind] += float((full[kind::2] == half[kind::2]).sum())
                flips["to_skip"][kind] += float((full[kind::2] & ~half[kind::2]).sum())
                flips["to_execute"][kind] += float((~full[kind::2] & half[kind::2]).sum())
            pairs_per_kind += full[0::2].numel()
            scored += window.shape[1] - 1
    total_pairs = 2 * pairs_per_kind
    commit = code_revision()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "skipgpt"], capture_output=True, text=True).stdout.strip())
    ppl = {name: math.exp(v / scored) for name, v in nll.items()}
    result = {
        "model": args.model, "routers": args.routers, "dtype": args.dtype, "device": args.device,
        "data": args.data, "windows": windows.shape[0], "seq_len": args.seq_len, "tokens": scored,
        "whole_test_set": not args.max_windows, "commit": commit, "tree_dirty": dirty,
        "decision_pairs": total_pairs, "agreement": float(agree.sum()) / total_pairs,
        "agreement_attn": float(agree[0]) / pairs_per_kind, "agreement_mlp": float(agree[1]) / pairs_per_kind,
        "flips_to_skip": flips["to_skip"].tolist(), "flips_to_execute": flips["to_execute"].tolist(),
        "skip_share": {name: v / total_pairs for name, v in skipped.items()},
        "ppl": ppl, "ppl_ratio": ppl[args.dtype] / ppl["float32"], "wall_s": round(time.perf_counter() - start, 1),
    }
    rows = [(name, f"{ppl[name]:.3f}", f"{100 * result['skip_share'][name]:.2f} %") for name in models]
    text = table(["model dtype", "perplexity", "(token, module) pairs skipped"], rows)
    text += (f"\n\n{args.dtype} against float32 on {result['windows']} windows of {args.seq_len} tokens of {args.data} test"
             f"{' (the whole set)' if not args.max_windows else ' (a short-window ablation, not the whole set)'}: decisions agree on "
             f"{100 * result['agreement']:.3f} % of {total_pairs:,} (token, module) pairs (attention {100 * result['agreement_attn']:.3f} %, "
             f"MLP {100 * result['agreement_mlp']:.3f} %); perplexity ratio {result['ppl_ratio']:.4f}. Routers {args.routers}, "
             f"commit {commit}{' + uncommitted changes' if dirty else ''}, {result['wall_s']:.0f} s.\n")
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(f"{out}.json"), result)  # not with_suffix: router names may hold dots
    Path(f"{out}.md").write_text(text)
    print(f"wrote {out}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()

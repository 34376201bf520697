"""Stage 2 (LoRA with frozen routers) through the skipping path against the masked computation.

    python benchmarks/stage2.py                       # SmolLM2-135M + the shipped 25 % set, fp32
    python benchmarks/stage2.py --bf16 --pairs 7      # under bf16 autocast, as `finetune --bf16`

With frozen argmax decisions the gathered computation is differentiable, so a training step runs
only the executing tokens through each module (``RoutingState.skipping``); the masked computation
(every branch for every token, multiplied by its 0/1 gate) is what stage 2 ran before. Both run on
the same model and batches, interleaved A/B (the machine is shared and noisy): one "step" is a
forward and backward of one micro-batch, as ``finetune`` takes it (the optimizer step costs the
same either way and is left out). Prints the median ratio of steps per minute with its spread,
and writes a JSON beside the table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from skipgpt.data import load_source, tokenize
from skipgpt.evaluation.report import table
from skipgpt.files import write_json
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers
from skipgpt.routing.surgery import routing_state, set_gate_mode
from skipgpt.training.finetune import FinetuneConfig, add_lora


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> float:
    autocast = torch.autocast(batch.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    tick = time.perf_counter()
    with autocast:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", default="smollm2-135m-rt25")
    p.add_argument("--data", default="wikitext2", help="text the batches come from (its validation split)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--pairs", type=int, default=5, help="interleaved A/B pairs (each: one step of each)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default="docs/results/stage2_speed_smollm2_rt25")
    args = p.parse_args()

    model, tokenizer = load_model(args.model)
    load_routers(model, args.routers)
    peft_model = add_lora(model, FinetuneConfig())
    peft_model.train()
    set_gate_mode(model, "argmax")  # what finetune's RT-L step sets: frozen decisions
    state = routing_state(model)
    ids = tokenize(tokenizer, load_source(args.data, "valid", args.data_dir).text())
    need = (args.pairs + 1) * args.batch_size * args.seq_len
    batches = ids[:need].view(-1, args.batch_size, args.seq_len)
    times: dict[bool, list[float]] = {True: [], False: []}
    for pair, batch in enumerate(batches):
        for skip in ((True, False) if pair % 2 else (False, True)):
            state.skip_compute = skip
            seconds = step_seconds(peft_model, batch, args.bf16)
            if pair:  # the first pair warms both paths up
                times[skip].append(seconds)
        print(f"pair {pair}/{args.pairs}: skipping {times[True][-1] if pair else 0:.2f} s, masked {times[False][-1] if pair else 0:.2f} s",
              file=sys.stderr)
    state.skip_compute = True
    ratios = [m / s for s, m in zip(times[True], times[False])]
    with torch.no_grad():
        peft_model(input_ids=batches[0], use_cache=False)
    sparsity = state.last_stats().as_dict()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "model": args.model, "routers": args.routers, "bf16": args.bf16, "batch": [args.batch_size, args.seq_len],
        "threads": torch.get_num_threads(), "commit": commit, "param_ratio_of_a_batch": sparsity["param_ratio"],
        "skipping_step_s": times[True], "masked_step_s": times[False],
        "steps_per_minute_ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }
    rows = [("skipping path (this change)", f"{statistics.median(times[True]):.2f}", f"{60 / statistics.median(times[True]):.1f}"),
            ("masked computation (before)", f"{statistics.median(times[False]):.2f}", f"{60 / statistics.median(times[False]):.1f}")]
    text = table(["stage-2 step", "median s", "steps/min"], rows)
    text += (f"\n\nsteps per minute, skipping / masked: median {result['steps_per_minute_ratio_median']:.3f} "
             f"(min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}, {len(ratios)} interleaved pairs; "
             f"{args.batch_size} x {args.seq_len} tokens, {'bf16 autocast' if args.bf16 else 'float32'}, "
             f"{torch.get_num_threads()} threads, ratio {sparsity['param_ratio']:.3f} on the first batch; commit {commit})\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out + ".json"), result)
    Path(args.out + ".md").write_text(text)


if __name__ == "__main__":
    main()

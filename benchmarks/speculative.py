"""Self-speculative decoding side by side with HF dense greedy and HF prompt-lookup decoding.

    SKIPGPT_DATA_DIR=... python benchmarks/speculative.py            # SmolLM2-135M, CPU fp32, 50 + 50 prompts x 128 tokens
    python benchmarks/speculative.py --routers runs/rt25,runs/rt40 --static 0.25,0.4,0.6 --synthetic 0.6
    python benchmarks/speculative.py --device cuda --dtype bfloat16 --shape llama2-7b   # random 7B-shaped model: timing only
    python benchmarks/speculative.py --prompts 2 --new-tokens 8 --out /tmp/spec          # smoke run

Batch 1 (latency), greedy. Prompt sets, from $SKIPGPT_DATA_DIR: ``wikitext`` (WikiText-2 test
paragraphs, first ``--prompt-words`` words) and ``chat`` (instructions assembled from ARC-Easy,
ARC-Challenge, OpenBookQA and PIQA questions, in the tokenizer's chat template); with ``--shape``,
random token ids. Configurations, all on one model object, run round-robin per prompt (the start
rotates from prompt to prompt; the machine is shared and noisy):

* HF dense: ``model.generate(do_sample=False)`` with no routers attached: baseline and reference;
* HF prompt lookup: ``model.generate(prompt_lookup_num_tokens=N)`` (lossless too);
* speculative: :func:`skipgpt.speculative_decode` for every router set x every ``--draft-tokens``.

Router sets: trained (``--routers``), static Block-Influence cuts (``--static``: the modules with
the lowest Block Influence skipped for every token, untrained, as ``tune --init importance``
starts; what Draft & Verify / SWIFT draft with) and synthetic random per-token routers
(``--synthetic``, as benchmarks/speed.py; a poor draft, labelled). Reported per prompt set:
tokens/s (new tokens over wall time, prefill included), speedup over HF dense, the acceptance
rate, the mean accepted length (tokens per dense forward), the draft's parameter ratio, and
mismatches: prompts whose output differs from HF dense greedy in any token.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from speed import DTYPES, SHAPES, build_model, synthetic_routers, write_report

from skipgpt import RouterConfig, attach_routers, detach_routers, has_routers, load_routers, measure_sparsity, speculative_decode
from skipgpt.data import DATA_DIR_ENV, data_dir
from skipgpt.inference.generate import _encode
from skipgpt.inference.speculative import parse_draft_tokens
from skipgpt.routing.save_load import load_routers_state_dict, routers_state_dict
from skipgpt.routing.surgery import routing_state
from skipgpt.training.importance import seed_routers_from_importance

# --- prompts -------------------------------------------------------------------------------------

def wikitext_prompts(root: Path, count: int, words: int, skip: int = 0) -> list[str]:
    lines = (root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    paragraphs = [line.strip() for line in lines if len(line.split()) > words and not line.strip().startswith("=")]
    return [" ".join(p.split()[:words]) for p in paragraphs[skip : skip + count]]


def chat_prompts(root: Path, count: int) -> list[str]:
    """Instructions from four zero-shot sets, interleaved: questions a chat user might ask."""
    def arc(name: str, path: str) -> list[str]:
        rows = [json.loads(line) for line in (root / "zeroshot" / name / path).read_text(encoding="utf-8").splitlines() if line.strip()]
        return [f"Answer this science question and explain your answer briefly.\n{r['question']['stem']}\n"
                + "\n".join(f"({c['label']}) {c['text']}" for c in r["question"]["choices"]) for r in rows]

    with (root / "zeroshot" / "openbookqa" / "test.tsv").open(encoding="utf-8") as f:
        obqa = [f"Complete the sentence with the right option and say why.\n{r['Question Stem']}\n{r['Choices']}"
                for r in csv.DictReader(f, delimiter="\t")]
    piqa = [json.loads(line) for line in (root / "zeroshot" / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    piqa_prompts = [f"{r['goal']}\nWhich way is better, and why?\n1. {r['sol1']}\n2. {r['sol2']}" for r in piqa]
    sources = [arc("arc_easy", "ARC-Easy-Test.jsonl"), arc("arc_challenge", "ARC-Challenge-Test.jsonl"), obqa, piqa_prompts]
    mixed = [s[i] for i in range(max(map(len, sources))) for s in sources if i < len(s)]
    return mixed[:count]


def prompt_sets(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each set's prompts as model inputs (batch 1)."""
    if args.shape:
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        return {"random": [{"input_ids": torch.randint(0, vocab, (1, args.prompt_words), generator=g).to(args.device)}
                           for _ in range(args.prompts)]}
    root = data_dir()
    if root is None:
        sys.exit(f"set {DATA_DIR_ENV}=DIR (WikiText-2 and the zero-shot sets; see the shared data's SOURCES.md)")
    texts = {"wikitext": (wikitext_prompts(root, args.prompts, args.prompt_words), False),
             "chat": (chat_prompts(root, args.prompts), True)}
    device = torch.device(args.device)
    return {name: [dict(_encode(tokenizer, [t], chat, device)) for t in prompts]
            for name, (prompts, chat) in texts.items() if name in args.sets}


def calibration_ids(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """Text the static cuts and synthetic routers are set on, apart from the prompts."""
    if args.shape:
        return torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1)).to(args.device)
    texts = wikitext_prompts(data_dir(), 4, 100, skip=args.prompts + 10)
    return torch.cat([tokenizer(t, return_tensors="pt").input_ids[:, :96] for t in texts]).to(args.device)


# --- router sets ---------------------------------------------------------------------------------

class RouterSet:
    """Weights and config of one router set, put on and taken off the shared model."""

    def __init__(self, name: str, model: torch.nn.Module):
        state = routing_state(model)
        self.name, self.config, self.threshold = name, state.config.to_dict(), state.config.threshold
        self.weights = routers_state_dict(model)
        detach_routers(model)

    def apply(self, model: torch.nn.Module) -> None:
        attach_routers(model, RouterConfig.from_dict(self.config))
        load_routers_state_dict(model, self.weights)
        routing_state(model).config.threshold = self.threshold


def router_sets(args: argparse.Namespace, model: torch.nn.Module, calib: torch.Tensor) -> list[RouterSet]:
    sets = []
    for directory in [d for arg in args.routers for d in arg.split(",") if d]:
        load_routers(model, directory)
        sets.append(RouterSet(f"trained {Path(directory).name}", model))
    for ratio in args.static:
        attach_routers(model, RouterConfig())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".skip_routers." in name and name.endswith("weight"):
                    p.zero_()  # the bias alone decides: the same cut for every token
        seed_routers_from_importance(model, calib, ratio, "params")
        sets.append(RouterSet(f"static BI cut {ratio:.0%}", model))
    for ratio in args.synthetic:
        weights = synthetic_routers(model, ratio, calib)
        attach_routers(model, RouterConfig(init_bias=0.0))
        load_routers_state_dict(model, weights)
        sets.append(RouterSet(f"synthetic {ratio:.0%}", model))
    return sets


# --- measurement ---------------------------------------------------------------------------------

class Config:
    """One row: how to generate, with its running totals over the prompts of a set."""

    def __init__(self, name: str, run: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, Any]],
                 routers: RouterSet | None = None):
        self.name, self.run, self.routers = name, run, routers
        self.totals: dict[str, dict[str, Any]] = {}

    def measure(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, device: str) -> tuple[torch.Tensor, float, Any, Any]:
        if self.routers:
            self.routers.apply(model)
        meter = measure_sparsity(model) if self.routers else contextlib.nullcontext()
        try:
            with torch.no_grad(), meter as sparsity:
                _sync(device)
                start = time.perf_counter()
                out, stats = self.run(inputs, new_tokens)
                _sync(device)
                seconds = time.perf_counter() - start
            return out, seconds, stats, sparsity.summary()["param_ratio"] if sparsity else None
        finally:
            if has_routers(model):
                detach_routers(model)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_configs(args: argparse.Namespace, model: torch.nn.Module, sets: list[RouterSet], pad: int) -> list[Config]:
    def hf(**extra: Any) -> Callable:
        return lambda inputs, n: (model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=pad, **extra), None)

    def speculative(k: int | str) -> Callable:
        return lambda inputs, n: speculative_decode(model, inputs["input_ids"], inputs.get("attention_mask"),
                                                    max_new_tokens=n, draft_tokens=k, pad_token_id=pad)

    configs = [Config("HF dense greedy", hf())]
    if args.prompt_lookup:
        configs.append(Config(f"HF prompt lookup ({args.prompt_lookup})", hf(prompt_lookup_num_tokens=args.prompt_lookup)))
    configs += [Config(f"speculative, {s.name}, K={k}", speculative(k), s) for s in sets for k in args.draft_tokens]
    return configs


def bench_set(model: torch.nn.Module, configs: list[Config], name: str, prompts: list[dict[str, torch.Tensor]],
              args: argparse.Namespace) -> None:
    for cfg in configs:
        cfg.totals[name] = {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "rounds": 0, "committed": 0,
                            "mismatches": 0, "ratios": []}
    for cfg in configs:  # warm-up, not recorded
        cfg.measure(model, prompts[0], 4, args.device)
    for i, inputs in enumerate(prompts):
        outputs = {}
        for j in range(len(configs)):
            cfg = configs[(i + j) % len(configs)]
            out, seconds, stats, ratio = cfg.measure(model, inputs, args.new_tokens, args.device)
            t = cfg.totals[name]
            t["tokens"] += out.shape[1] - inputs["input_ids"].shape[1]
            t["seconds"] += seconds
            if stats is not None:
                t["drafted"] += stats.drafted
                t["accepted"] += stats.accepted
                t["rounds"] += stats.rounds
                t["committed"] += stats.committed_drafts
            if ratio is not None:
                t["ratios"].append(ratio)
            outputs[cfg.name] = out
        reference = outputs[configs[0].name]
        for cfg in configs[1:]:
            cfg.totals[name]["mismatches"] += int(not torch.equal(outputs[cfg.name], reference))
        print(f"  {name} {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)


def rows_of(configs: list[Config], set_name: str, prompts: int) -> list[dict[str, Any]]:
    base = configs[0].totals[set_name]
    base_rate = base["tokens"] / base["seconds"]
    rows = []
    for cfg in configs:
        t = cfg.totals[set_name]
        rate = t["tokens"] / t["seconds"]
        rows.append({
            "set": set_name, "config": cfg.name, "prompts": prompts, "new_tokens": t["tokens"],
            "tokens_per_s": rate, "speedup": rate / base_rate,
            "acceptance_rate": t["accepted"] / t["drafted"] if t["drafted"] else None,
            "mean_accepted_length": (t["committed"] + t["rounds"]) / t["rounds"] if t["rounds"] else None,
            "draft_param_ratio": sum(t["ratios"]) / len(t["ratios"]) if t["ratios"] else None,
            "mismatches": None if cfg is configs[0] else t["mismatches"],
        })
    return rows


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape (timing only; no download)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--routers", action="append", default=[], help="trained router directories (repeatable or comma-separated)")
    p.add_argument("--static", type=_floats, default=[0.25, 0.4, 0.6], help="static Block-Influence cuts at these ratios")
    p.add_argument("--synthetic", type=_floats, default=[], help="synthetic random per-token routers at these skip rates")
    p.add_argument("--draft-tokens", default="4,auto", help="comma-separated K values (integers or 'auto')")
    p.add_argument("--prompt-lookup", type=int, default=10, help="HF prompt-lookup candidate tokens (0: no such row)")
    p.add_argument("--sets", default="wikitext,chat")
    p.add_argument("--prompts", type=int, default=50, help="prompts per set")
    p.add_argument("--prompt-words", type=int, default=64, help="words per WikiText-2 prompt (tokens with --shape)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="runs/bench/speculative")
    args = p.parse_args()
    args.draft_tokens = [parse_draft_tokens(k) for k in args.draft_tokens.split(",")]
    args.sets = args.sets.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    tokenizer = None
    if not args.shape:
        from skipgpt.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    sets = prompt_sets(args, model, tokenizer)
    routers = router_sets(args, model, calibration_ids(args, model, tokenizer))
    configs = make_configs(args, model, routers, pad)
    rows = []
    for name, prompts in sets.items():
        bench_set(model, configs, name, prompts, args)
        rows += rows_of(configs, name, len(prompts))

    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    headers = ["set", "config", "tokens/s", "speedup", "acceptance", "mean accepted length", "draft param ratio", "mismatches"]
    lines = [(r["set"], r["config"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}", pct(r["acceptance_rate"]),
              "–" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}", pct(r["draft_param_ratio"]),
              "–" if r["mismatches"] is None else f"{r['mismatches']}/{r['prompts']}") for r in rows]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    title = (f"Self-speculative decoding: {args.shape or args.model}, {args.dtype}, {where}, batch 1, greedy, "
             f"{args.new_tokens} new tokens, {args.prompts} prompts per set")
    write_report(Path(args.out) / "speculative", title, headers, lines, args, rows)


if __name__ == "__main__":
    main()

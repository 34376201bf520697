"""Speed of routed models against HF dense, measured in interleaved pairs.

    python benchmarks/speed.py                                    # shipped rt25 + rt40 sets, full grid (~2.5 h on 2 CPU cores)
    python benchmarks/speed.py --batch-sizes 1,8 --prompt-lengths 1024 --kv-policies keep --routers smollm2-135m-rt25
    python benchmarks/speed.py --quick                            # seconds: a smoke run written to /tmp
    python benchmarks/speed.py --shape llama2-7b --dtype bfloat16 --device cuda   # random 7B-shaped model, synthetic routers

One model object; HF dense is that model with no routers attached (routers are attached for each
routed run and detached after it). In each cell (batch size x prompt length) every routed configuration is timed in
``--pairs`` pairs: a dense run and a routed run back to back, in the order A/B, then B/A for the next
pair (drift cancels), after one warm-up run of each configuration. A run is:

* prefill: one forward over the prompt that fills a fresh KV cache (logits of the last position
  only); short prefills are repeated within the run to last ``--min-prefill-s`` (mean per prefill);
* decode: ``--new-tokens`` greedy steps on that cache, one token per sequence per step.

Each pair gives a ratio dense time / routed time (a speedup); a row reports the median of its pair
ratios, their range (min-max) and their interquartile range. Ideal speedup: dense FLOPs / executed
FLOPs counted from the routing decisions of the (untimed) warm-up run (skipgpt.inference.cost);
efficiency = measured median / ideal. KV cache: bytes the cache holds after the last step.

Rows: the router sets (``--routers``, by default the shipped ``smollm2-135m-rt25`` and ``-rt40``)
under each ``--kv-policies``, and "nothing skipped": the first set with threshold -inf, every token
executes, so the row is the fixed cost of routing. The shipped sets were trained with KV policy
``keep``; their ``drop`` rows run the same routers with ``drop`` (labelled so). Without router sets
(``--shape``, or ``--routers ""``), synthetic random routers skip each of ``--ratios``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from skipgpt import DroppedKVCache, RouterConfig, attach_routers, detach_routers, has_routers, load_routers, measure_sparsity, routing_state
from skipgpt.data import load_source, tokenize
from skipgpt.evaluation.report import table
from skipgpt.files import write_json
from skipgpt.identity import code_revision
from skipgpt.inference.cost import FlopCount, ModelShape, replacement_flops, router_flops
from skipgpt.models import load_model, load_tokenizer
from skipgpt.routing.save_load import load_routers_state_dict, routers_state_dict

SHAPES = {  # random-weight models for timing only; no download
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_ROUTERS = "smollm2-135m-rt25,smollm2-135m-rt40"
_TEXT_IDS: dict[tuple, torch.Tensor] = {}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    dtype = DTYPES[args.dtype]
    if args.shape:
        config = LlamaConfig(**SHAPES[args.shape])
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return model.eval()
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    return model


def prompt_ids(model: torch.nn.Module, args: argparse.Namespace, batch: int, length: int) -> torch.Tensor:
    """Consecutive windows of real text where the model has a tokenizer and text is given (trained
    routers decide on content); random ids otherwise."""
    text = getattr(args, "text_file", None) or getattr(args, "text", None)
    if text and not getattr(args, "shape", None):
        key = (args.model, text, getattr(args, "text_split", "valid"))
        if key not in _TEXT_IDS:
            source = load_source(text, key[2]) if not Path(text).is_file() else None
            raw = source.text() if source else Path(text).read_text()
            _TEXT_IDS[key] = tokenize(load_tokenizer(args.model), raw)
        ids = _TEXT_IDS[key]
        if ids.numel() < batch * length:
            sys.exit(f"the prompt text {text} has {ids.numel()} tokens, the benchmark needs {batch * length}")
        return ids[: batch * length].view(batch, length).to(args.device)
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(args.device)


def synthetic_routers(model: torch.nn.Module, skip: float, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Random routers whose execute bias makes each module skip ``skip`` of the tokens."""
    attach_routers(model, RouterConfig(init_bias=0.0))
    state = routing_state(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".skip_routers." in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
        # Skipping upstream changes what downstream routers see: shift each module's bias to its
        # skip quantile under the routing of the previous round, a few rounds.
        for _ in range(4):
            state.margin_log = [[] for _ in range(state.num_modules)]
            model(input_ids=calib)
            margins = [torch.cat(m) for m in state.margin_log]
            for layer in state.adapter.decoder_layers(model):
                for offset, kind in enumerate(("attn", "mlp")):
                    m = margins[2 * layer.skipgpt_index + offset]
                    layer.skip_routers[kind].net.bias[1] -= torch.quantile(m.float(), skip)
        state.margin_log = None
    weights = routers_state_dict(model)
    detach_routers(model)
    return weights


class Config:
    """One benchmarked configuration: routers to put on the shared model (``apply``; None: the
    model as it is) or a model of its own (``model``: a pruned copy), and what its runs measured."""

    def __init__(self, name: str, routing: str, apply: Callable[[torch.nn.Module], None] | None = None, policy: str = "keep",
                 model: torch.nn.Module | None = None, note: str = ""):
        self.name, self.routing, self.apply, self.policy, self.model, self.note = name, routing, apply, policy, model, note
        self.reset()

    def reset(self) -> None:
        self.prefill_s, self.decode_s, self.pairs = [], [], []  # seconds per run; per pair: both runs' times
        self.prefill_flops, self.decode_flops = FlopCount(), FlopCount()
        self.kv_bytes, self.param_ratio, self.peak_mib = 0, None, None


def routed_apply(weights: dict[str, torch.Tensor], config: RouterConfig, threshold: float, policy: str) -> Callable:
    def apply(m: torch.nn.Module) -> None:
        attach_routers(m, RouterConfig.from_dict({**config.to_dict(), "kv_policy": policy}))
        load_routers_state_dict(m, weights)
        routing_state(m).config.threshold = threshold
    return apply


def read_set(model: torch.nn.Module, name: str) -> tuple[dict[str, torch.Tensor], RouterConfig]:
    """A router set's weights and config, leaving the model without routers."""
    load_routers(model, name)
    state = routing_state(model)
    weights, config = routers_state_dict(model), RouterConfig.from_dict(state.config.to_dict())
    detach_routers(model)
    return weights, config


def policy_label(trained: str, policy: str) -> str:
    return f"trained ({trained})" if trained == policy else f"trained with {trained}, run with {policy}"


def make_configs(model: torch.nn.Module, args: argparse.Namespace, calib: torch.Tensor) -> list[Config]:
    """HF dense first, then "nothing skipped" and the routed rows, each under every KV policy."""
    configs = [Config("HF dense", "none")]
    routers = [r for r in (args.routers or "").split(",") if r] if isinstance(args.routers, (str, type(None))) else list(args.routers)
    sets = [(Path(name).name, *read_set(model, name)) for name in routers]
    if sets:  # nothing skipped: the first set's routers deciding, threshold -inf
        base_weights, base_config = sets[0][1], sets[0][2]
        base_label = f"{sets[0][0]} routers"
    else:
        base_weights, base_config, base_label = synthetic_routers(model, 0.5, calib), RouterConfig(init_bias=0.0), "synthetic routers"
    for policy in args.kv_policies:
        configs.append(Config("nothing skipped", f"{base_label}, threshold -inf, {policy}",
                              routed_apply(base_weights, base_config, float("-inf"), policy), policy))
    for label, weights, config in sets:
        for policy in args.kv_policies:
            configs.append(Config(label, policy_label(config.kv_policy, policy), routed_apply(weights, config, config.threshold, policy), policy))
    for ratio in getattr(args, "ratios", None) or []:
        weights = synthetic_routers(model, ratio, calib)
        for policy in args.kv_policies:
            configs.append(Config(f"skip {ratio:.2f}", "synthetic",  # names benchmarks/scale.py parses
                                  routed_apply(weights, RouterConfig(init_bias=0.0), 0.0, policy), policy))
    return configs


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_once(model: torch.nn.Module, cfg: Config, ids: torch.Tensor, new_tokens: int, device: str, record: bool,
             repeats: int = 1) -> tuple[float, float]:
    """One run: (seconds per prefill, seconds of decoding). ``record``: count FLOPs, skipped
    parameters and KV bytes (an untimed run: the sparsity meter and the accounting cost time)."""
    shape = ModelShape.from_config(model.config)
    routed = has_routers(model)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    batch, length = ids.shape
    stored: list[torch.Tensor | None] = [None]  # keys per layer under "drop", for the cost model

    def account(flops: FlopCount, tokens: int, context_start: int) -> None:
        context = torch.arange(context_start + 1, context_start + tokens + 1).expand(batch, tokens)
        router = routing_state(model).config if routed else None
        gates = routing_state(model).stacked_gates().cpu() if routed else None
        replacement = replacement_flops(shape.hidden, router.replacement, router.replacement_rank) if router else 0.0
        routers = router_flops(shape.hidden, router.router, router.input_norm) if router else 0.0
        stored[0] = flops.add(shape, context, torch.ones(batch, tokens, dtype=torch.bool), gates, logits_tokens=batch,
                              kv_policy=cfg.policy if routed else "keep", keys_before=stored[0], replacement=replacement,
                              router=routers)

    prefill = decode = 0.0
    with torch.no_grad(), contextlib.ExitStack() as stack:
        sparsity = stack.enter_context(measure_sparsity(model)) if routed and record else None
        for _ in range(repeats):
            mask = torch.ones_like(ids)
            cache = DroppedKVCache() if routed and cfg.policy == "drop" else DynamicCache(config=model.config)
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            _sync(device)
            prefill += (time.perf_counter() - start) / repeats
        if record:
            account(cfg.prefill_flops, length, 0)
        cache = getattr(out, cache_kw)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kw: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            decode += time.perf_counter() - start
            if record:
                account(cfg.decode_flops, 1, length + step)
        if record:
            cfg.param_ratio = sparsity.summary()["param_ratio"] if sparsity else None
    if record:
        cfg.kv_bytes = sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
                           for layer in cache.layers if layer.is_initialized)
    return prefill, decode


def run_config(model: torch.nn.Module, cfg: Config, ids: torch.Tensor, args: argparse.Namespace, record: bool = False,
               repeats: int = 1) -> tuple[float, float]:
    target = cfg.model if cfg.model is not None else model
    if cfg.apply is not None:
        cfg.apply(target)
    cuda = str(args.device).startswith("cuda")
    try:
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = run_once(target, cfg, ids, args.new_tokens, args.device, record, repeats)
        if cuda:
            cfg.peak_mib = max(cfg.peak_mib or 0.0, torch.cuda.max_memory_allocated() / 2**20)
    finally:
        if cfg.apply is not None and has_routers(target):
            detach_routers(target)
    return times


def run_weight(batch: int, length: int, new_tokens: int, repeats: int = 1) -> float:
    """Rough cost of one run in prefill tokens (a CPU decode step of batch b: about 30 + 6 b), for the ETA."""
    return batch * length * repeats + new_tokens * (30 + 6 * batch)


def progress_bar(total: float, desc: str) -> tuple[tqdm, Callable[[float, str], None]]:
    """A bar over run weights (:func:`run_weight`) with ETA on stderr, and the callback that moves it."""
    bar = tqdm(total=total, desc=desc, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def progress(weight: float, what: str) -> None:
        bar.total = max(bar.total, bar.n + weight)  # repeated prefills cost more than planned
        bar.set_postfix_str(what, refresh=False)
        bar.update(weight)
    return bar, progress


def ratio_stats(ratios: list[float]) -> dict[str, Any]:
    """Median, range and interquartile range of the per-pair speedups."""
    if not ratios:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "ratios": []}
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "q1": q1, "q3": q3, "ratios": ratios}


def bench_cell(model: torch.nn.Module, configs: list[Config], ids: torch.Tensor, args: argparse.Namespace,
               progress: Callable[[float, str], None] | None = None) -> list[dict[str, Any]]:
    """Time every configuration against ``configs[0]`` (HF dense) in interleaved pairs; one row each."""
    pairs = getattr(args, "pairs", None) or getattr(args, "reps", 5)
    tick = progress or (lambda _w, _d: None)
    batch, length = ids.shape
    dense, routed = configs[0], configs[1:]
    for cfg in configs:  # warm-up, and the untimed run that counts FLOPs, skips and KV bytes
        cfg.reset()
        warm_prefill, _ = run_config(model, cfg, ids, args, record=True)
        if cfg is dense:
            min_s = getattr(args, "min_prefill_s", 0.0) or 0.0
            repeats = max(1, min(20, math.ceil(min_s / max(warm_prefill, 1e-6))))
        tick(run_weight(batch, length, args.new_tokens), f"b{batch} p{length} warm-up {cfg.name}")
    for i in range(pairs):
        for j, cfg in enumerate(routed):
            order = (dense, cfg) if (i + j) % 2 == 0 else (cfg, dense)
            times = {}
            for c in order:
                times[c is dense] = run_config(model, c, ids, args, repeats=repeats)
                c.prefill_s.append(times[c is dense][0])
                c.decode_s.append(times[c is dense][1])
                tick(run_weight(batch, length, args.new_tokens, repeats), f"b{batch} p{length} pair {i + 1}/{pairs} {cfg.name} {cfg.policy}")
            cfg.pairs.append({"dense_prefill_s": times[True][0], "dense_decode_s": times[True][1],
                              "prefill_s": times[False][0], "decode_s": times[False][1], "dense_first": (i + j) % 2 == 0})
    rows = []
    for cfg in configs:
        pre = ratio_stats([p["dense_prefill_s"] / p["prefill_s"] for p in cfg.pairs])
        dec = ratio_stats([p["dense_decode_s"] / p["decode_s"] for p in cfg.pairs if p["decode_s"] > 0])
        if cfg is dense:  # the reference itself
            pre, dec = {**pre, "median": 1.0}, {**dec, "median": 1.0 if args.new_tokens else None}
        row = {"config": cfg.name, "routing": cfg.routing, "kv_policy": cfg.policy, "note": cfg.note, "batch": batch, "prompt": length,
               "new_tokens": args.new_tokens, "pairs": len(cfg.pairs), "prefill_repeats": repeats, "param_ratio": cfg.param_ratio,
               "prefill_tokens_per_s": batch * length / statistics.median(cfg.prefill_s) if cfg.prefill_s else None,
               "decode_tokens_per_s": batch * args.new_tokens / statistics.median(cfg.decode_s) if cfg.decode_s and args.new_tokens else None,
               "skipped_compute_prefill": 1 - cfg.prefill_flops.executed_fraction, "skipped_compute_decode": 1 - cfg.decode_flops.executed_fraction,
               "kv_mib": cfg.kv_bytes / 2**20, "peak_mib": cfg.peak_mib, "prefill_s": cfg.prefill_s, "decode_s": cfg.decode_s, "pair_times": cfg.pairs}
        for phase, stats, flops, base in (("prefill", pre, cfg.prefill_flops, dense.prefill_flops), ("decode", dec, cfg.decode_flops, dense.decode_flops)):
            # Against the dense model's FLOPs: a pruned model of its own counts its own, smaller, dense.
            ideal = base.dense / flops.executed if flops.executed and stats["median"] is not None else None
            # Best time against best time: interference on a shared machine only ever adds time, so
            # the minima estimate what the code itself costs; the median pair ratio what a run gets.
            mine = [p[f"{phase}_s"] for p in cfg.pairs if p[f"{phase}_s"] > 0]
            theirs = [p[f"dense_{phase}_s"] for p in cfg.pairs if p[f"{phase}_s"] > 0]
            stats = {**stats, "best": min(theirs) / min(mine) if mine and stats["median"] is not None else None}
            row.update({f"{phase}_speedup": stats["median"], f"{phase}_ideal": ideal,
                        f"{phase}_efficiency": stats["median"] / ideal if ideal else None,
                        **{f"{phase}_speedup_{k}": v for k, v in stats.items() if k != "median"}})
        rows.append(row)
    return rows


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _span(r: dict[str, Any], phase: str, low: str, high: str) -> str:
    a, b = r.get(f"{phase}_speedup_{low}"), r.get(f"{phase}_speedup_{high}")
    return "-" if a is None else f"{a:.2f}–{b:.2f}"


def markdown_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[tuple]]:
    headers = ["batch", "prompt", "config", "routing", "param ratio", "skipped compute", "prefill tok/s", "prefill × dense", "range",
               "IQR", "best/best", "ideal", "eff.", "decode tok/s", "decode × dense", "range", "IQR", "best/best", "ideal", "eff.", "KV MiB"]
    lines = [(r["batch"], r["prompt"], r["config"], r["routing"], _f(r["param_ratio"], ".1%"), _f(r["skipped_compute_prefill"], ".1%"),
              _f(r["prefill_tokens_per_s"], ".0f"), _f(r["prefill_speedup"]), _span(r, "prefill", "min", "max"), _span(r, "prefill", "q1", "q3"),
              _f(r.get("prefill_speedup_best")), _f(r["prefill_ideal"]), _f(r["prefill_efficiency"]), _f(r["decode_tokens_per_s"], ".1f"),
              _f(r["decode_speedup"]), _span(r, "decode", "min", "max"), _span(r, "decode", "q1", "q3"), _f(r.get("decode_speedup_best")),
              _f(r["decode_ideal"]), _f(r["decode_efficiency"]), _f(r["kv_mib"], ".1f")) for r in rows]
    return headers, lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead of --model (synthetic routers)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--routers", default=None, help=f"comma-separated router sets (default: {DEFAULT_ROUTERS}; '' for none)")
    p.add_argument("--ratios", default=None, help="synthetic skip fractions per module (default: none with router sets, else 0.25,0.4,0.6)")
    p.add_argument("--kv-policies", default="keep,drop")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--prompt-lengths", "--prompt-lens", dest="prompt_lengths", default="128,1024")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pairs", "--reps", dest="pairs", type=int, default=5, help="timed dense/routed pairs per row (after one warm-up)")
    p.add_argument("--min-prefill-s", type=float, default=1.0, help="repeat shorter prefills within a run to last this long")
    p.add_argument("--text", default=None, help="prompt text: a data set name (wikitext2, c4, ...) or a file "
                                               "(default: wikitext2 when $SKIPGPT_DATA_DIR is set, else random ids)")
    p.add_argument("--text-split", default="valid")
    p.add_argument("--text-file", default=None, help=argparse.SUPPRESS)  # the old name of --text FILE
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output stem: writes STEM.json and STEM.md "
                                              "(default: docs/results/speed_cpu_smollm2_shipped for the default model on CPU)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 pair, batch 1, 16-token prompt, 2 new tokens, out in /tmp")
    if p.parse_args(argv).quick:  # new defaults; flags given still win
        p.set_defaults(pairs=1, batch_sizes="1", prompt_lengths="16", new_tokens=2, min_prefill_s=0.0, out="/tmp/skipgpt_speed_quick")
    args = p.parse_args(argv)
    if args.routers is None:
        args.routers = "" if args.shape else DEFAULT_ROUTERS
    if args.ratios is None:
        args.ratios = "" if args.routers else "0.25,0.40,0.60"
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.kv_policies = [k for k in args.kv_policies.split(",") if k]
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    args.prompt_lengths = [int(n) for n in str(args.prompt_lengths).split(",") if n]
    if args.text is None and not args.text_file and os.environ.get("SKIPGPT_DATA_DIR"):
        args.text = "wikitext2"
    if args.out is None:
        default = args.model == "smollm2-135m" and not args.shape and args.device == "cpu"
        args.out = "docs/results/speed_cpu_smollm2_shipped" if default else f"runs/bench/speed_{args.shape or Path(args.model).name}_{args.device}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model = build_model(args)
    calib = prompt_ids(model, args, 1, 256) if args.ratios or not args.routers else None
    configs = make_configs(model, args, calib)
    cells = [(b, n) for b in args.batch_sizes for n in args.prompt_lengths]
    runs_per_cell = len(configs) + 2 * args.pairs * (len(configs) - 1)
    total = sum(runs_per_cell * run_weight(b, n, args.new_tokens) for b, n in cells)
    bar, progress = progress_bar(total, "speed")
    rows = []
    for batch, length in cells:
        rows += bench_cell(model, configs, prompt_ids(model, args, batch, length), args, progress)
    bar.close()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} torch threads)"
    title = (f"{args.shape or args.model}, {args.dtype}, {device}, commit {code_revision()}: speedup = dense time / routed time, "
             f"median of {args.pairs} interleaved pairs (range min–max, IQR), {args.new_tokens} new tokens")
    notes = ["Rows whose routing reads 'trained with keep, run with drop' use routers trained with KV policy keep, run with drop.",
             "'nothing skipped': routers deciding with threshold -inf, every token executes: the fixed cost of routing.",
             f"Prompts: {args.text_file or (args.text and f'{args.text} ({args.text_split} split)') or 'random token ids'}; load average {load_start[0]:.2f} at the start, "
             f"{os.getloadavg()[0]:.2f} at the end."]
    meta = {"commit": code_revision(), "device": device, "torch_threads": torch.get_num_threads(), "load_average": [load_start, os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes}
    headers, lines = markdown_rows(rows)
    write_report(Path(args.out), title, headers, lines, args, rows, meta=meta, notes=notes)


def write_report(stem: Path, title: str, headers: list[str], lines: list[tuple], args: argparse.Namespace,
                 rows: list[dict[str, Any]], meta: dict[str, Any] | None = None, notes: list[str] | None = None) -> None:
    """Print the table and write it as STEM.md, with STEM.json holding the rows and the run's options."""
    text = f"{title}\n\n{table(headers, lines)}\n" + "".join(f"\n{n}\n" for n in notes or [])
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    write_json(stem.with_suffix(".json"), {"title": title, "args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
                                           "transformers": transformers.__version__, **(meta or {}), "rows": rows})


if __name__ == "__main__":
    main()

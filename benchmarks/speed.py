"""Side-by-side speed of HF dense, the skipgpt path with nothing skipped, and real skipping.

    python benchmarks/speed.py                                   # SmolLM2-135M on this machine
    python benchmarks/speed.py --routers runs/kl70               # adds a trained router set's row
    python benchmarks/speed.py --shape llama2-7b --dtype bfloat16 --device cuda   # random 7B-shaped model

Every configuration runs on the same model object, interleaved round-robin over repetitions
(the machine is shared and noisy), and the table reports medians as ratios to HF dense:

* prefill: one forward over the prompt that fills a KV cache (logits for the last position only);
* decode: ``--new-tokens`` greedy steps on that cache, one token per sequence per step;
* ideal: dense FLOPs / executed FLOPs counted from the routing decisions of the same run
  (skipgpt.inference.cost); efficiency = measured speedup / ideal;
* KV cache: bytes the cache holds after the last step, measured on the cache object: policy
  ``keep`` stores every token (as dense), ``drop`` only tokens that executed attention (batch rows
  share slots, so batches save less than single sequences).

Routing is either a trained router set (``--routers``, labelled "trained") or synthetic: random
per-token routers whose biases are set so that every module skips the same fraction of tokens
(labelled "synthetic"): speed depends on how many tokens skip, not on which. Synthetic rows run
under each of ``--kv-policies``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from skipgpt import RouterConfig, attach_routers, detach_routers, load_routers, measure_sparsity, routing_state
from skipgpt.evaluation.report import table
from skipgpt.files import write_json
from skipgpt.inference.cost import FlopCount, ModelShape, replacement_flops
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers_state_dict, routers_state_dict

SHAPES = {  # random-weight models for timing only; no download
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """Real text where the model has a tokenizer and text is given (trained routers decide on
    content); random ids otherwise."""
    if args.text_file and not args.shape:
        from skipgpt.data import tokenize
        from skipgpt.models import load_tokenizer

        ids = tokenize(load_tokenizer(args.model), Path(args.text_file).read_text())
        need = batch * length
        if ids.numel() < need:
            sys.exit(f"--text-file has {ids.numel()} tokens, the benchmark needs {need}")
        return ids[:need].view(batch, length).to(args.device)
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
    """One benchmarked configuration: how to put routing on (and take it off) the model."""

    def __init__(self, name: str, routing: str, apply: Callable[[torch.nn.Module], None], policy: str = "keep"):
        self.name, self.routing, self.apply, self.policy = name, routing, apply, policy
        self.kv_bytes = 0
        self.prefill_s: list[float] = []
        self.decode_s: list[float] = []
        self.prefill_flops = FlopCount()
        self.decode_flops = FlopCount()
        self.param_ratio: float | None = None
        self.peak_mib: float | None = None


def make_configs(model: torch.nn.Module, args: argparse.Namespace, calib: torch.Tensor) -> list[Config]:
    def with_weights(weights: dict[str, torch.Tensor], threshold: float, config: RouterConfig, policy: str = "keep") -> Callable:
        def apply(m: torch.nn.Module) -> None:
            attach_routers(m, RouterConfig.from_dict({**config.to_dict(), "kv_policy": policy}))
            load_routers_state_dict(m, weights)
            routing_state(m).config.threshold = threshold
        return apply

    configs = [Config("HF dense", "none", lambda m: None)]
    synth_config = RouterConfig(init_bias=0.0)
    # Nothing skipped, routers still deciding: the cost of the skipping path itself.
    configs.append(Config("skipgpt, nothing skipped", "routers on, threshold -inf",
                          with_weights(synthetic_routers(model, 0.5, calib), float("-inf"), synth_config)))
    if args.routers:
        load_routers(model, args.routers)
        state = routing_state(model)
        weights, threshold, config = routers_state_dict(model), state.config.threshold, state.config
        detach_routers(model)
        configs.append(Config(f"trained ({Path(args.routers).name})", "trained",
                              with_weights(weights, threshold, config, config.kv_policy), config.kv_policy))
    for ratio in args.ratios:
        weights = synthetic_routers(model, ratio, calib)
        for policy in args.kv_policies:
            configs.append(Config(f"skip {ratio:.2f}", "synthetic", with_weights(weights, 0.0, synth_config, policy), policy))
    return configs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(model: torch.nn.Module, cfg: Config, ids: torch.Tensor, new_tokens: int, device: str, record: bool) -> None:
    shape = ModelShape.from_config(model.config)
    routed = hasattr(model, "skipgpt_state")
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    batch, length = ids.shape
    mask = torch.ones_like(ids)
    stored: list[torch.Tensor | None] = [None]  # keys per layer under "drop", for the cost model

    def account(flops: FlopCount, tokens: int, context_start: int) -> None:
        context = torch.arange(context_start + 1, context_start + tokens + 1).expand(batch, tokens)
        gates = routing_state(model).stacked_gates().cpu() if routed else None
        router = routing_state(model).config if routed else None
        replacement = replacement_flops(shape.hidden, router.replacement, router.replacement_rank) if router else 0.0
        stored[0] = flops.add(shape, context, torch.ones(batch, tokens, dtype=torch.bool), gates, logits_tokens=batch,
                              kv_policy=cfg.policy, keys_before=stored[0], replacement=replacement)

    meter = measure_sparsity(model) if routed else contextlib.nullcontext()
    with torch.no_grad(), meter as sparsity:
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                    **{cache_kw: DynamicCache(config=model.config)})  # "drop" routers swap in their own cache
        _sync(device)
        prefill = time.perf_counter() - start
        if record:
            account(cfg.prefill_flops, length, 0)
        cache = getattr(out, cache_kw)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = 0.0
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
        cfg.prefill_s.append(prefill)
        cfg.decode_s.append(decode)
        cfg.kv_bytes = sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
                           for layer in cache.layers if layer.is_initialized)
        cfg.param_ratio = sparsity.summary()["param_ratio"] if routed else None


def bench_cell(model: torch.nn.Module, configs: list[Config], ids: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    for cfg in configs:  # fresh statistics for this cell
        cfg.prefill_s, cfg.decode_s, cfg.prefill_flops, cfg.decode_flops = [], [], FlopCount(), FlopCount()
    for rep in range(args.reps + 1):  # repetition 0 warms up
        for cfg in configs:
            cfg.apply(model)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            run_once(model, cfg, ids, args.new_tokens, args.device, record=rep > 0)
            cfg.peak_mib = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
            if hasattr(model, "skipgpt_state"):
                detach_routers(model)
    batch, length = ids.shape
    base_prefill = statistics.median(configs[0].prefill_s)
    base_decode = statistics.median(configs[0].decode_s)
    rows = []
    for cfg in configs:
        prefill, decode = statistics.median(cfg.prefill_s), statistics.median(cfg.decode_s)
        rows.append({
            "config": cfg.name, "routing": cfg.routing, "kv_policy": cfg.policy, "batch": batch, "prompt": length, "new_tokens": args.new_tokens,
            "prefill_tokens_per_s": batch * length / prefill, "prefill_speedup": base_prefill / prefill,
            "prefill_ideal": cfg.prefill_flops.ideal_speedup,
            "decode_tokens_per_s": batch * args.new_tokens / decode, "decode_speedup": base_decode / decode,
            "decode_ideal": cfg.decode_flops.ideal_speedup,
            "param_ratio": cfg.param_ratio,
            "skipped_compute_prefill": 1 - cfg.prefill_flops.executed_fraction,
            "skipped_compute_decode": 1 - cfg.decode_flops.executed_fraction,
            "kv_mib": cfg.kv_bytes / 2**20,
            "peak_mib": cfg.peak_mib,
            "prefill_s": cfg.prefill_s, "decode_s": cfg.decode_s,
        })
    for r in rows:
        r["prefill_efficiency"] = r["prefill_speedup"] / r["prefill_ideal"]
        r["decode_efficiency"] = r["decode_speedup"] / r["decode_ideal"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead of --model")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--routers", help="a trained router set for --model (adds a 'trained' row)")
    p.add_argument("--text-file", help="prompt text (default: random token ids)")
    p.add_argument("--ratios", default="0.25,0.40,0.60", help="synthetic skip fractions per module")
    p.add_argument("--kv-policies", default="keep,drop", help="KV policies of the synthetic rows")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-lens", default="128,1024")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.kv_policies = [k for k in args.kv_policies.split(",") if k]
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    calib = prompt_ids(model, args, 1, 256)
    configs = make_configs(model, args, calib)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for length in (int(n) for n in args.prompt_lens.split(",")):
            print(f"batch {batch}, prompt {length} ...", file=sys.stderr, flush=True)
            rows += bench_cell(model, configs, prompt_ids(model, args, batch, length), args)
    headers = ["batch", "prompt", "config", "routing", "KV policy", "param ratio", "skipped compute", "prefill tok/s", "speedup", "ideal", "eff.",
               "decode tok/s", "speedup", "ideal", "eff.", "KV cache MiB", "peak MiB"]
    lines = [(r["batch"], r["prompt"], r["config"], r["routing"], r["kv_policy"], "-" if r["param_ratio"] is None else f"{r['param_ratio']:.1%}",
              f"{r['skipped_compute_prefill']:.1%}",
              f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_speedup']:.2f}", f"{r['prefill_ideal']:.2f}",
              f"{r['prefill_efficiency']:.2f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_speedup']:.2f}",
              f"{r['decode_ideal']:.2f}", f"{r['decode_efficiency']:.2f}", f"{r['kv_mib']:.1f}",
              "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}")
             for r in rows]
    title = f"{args.shape or args.model}, {args.dtype}, {device_name}, {args.new_tokens} new tokens, median of {args.reps}"
    write_report(Path(args.out) / "speed", title, headers, lines, args, rows)


def write_report(stem: Path, title: str, headers: list[str], lines: list[tuple], args: argparse.Namespace,
                 rows: list[dict[str, Any]]) -> None:
    """Print the table and write it as STEM.md, with STEM.json holding the rows and the run's options."""
    text = f"{title}\n\n{table(headers, lines)}\n"
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    write_json(stem.with_suffix(".json"), {"title": title, "args": dict(vars(args)), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()

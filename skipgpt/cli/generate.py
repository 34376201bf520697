"""``skipgpt generate``: complete prompts with a routed model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SkipGPTError
from ..evaluation.report import pct, table
from ..files import write_json
from ..inference.generate import GenerateConfig, generate
from ..inference.speculative import parse_draft_tokens
from .common import (
    model_args,
    routed_model,
    strict_arg,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete prompts with a routed model (skipped modules are not computed)")
    model_args(p)
    strict_arg(p)
    p.add_argument("--routers", help="router directory (omit for the dense model)")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--pruned", help="pruned-model directory from 'skipgpt prune' or 'skipgpt compare'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch (left-padded)")
    p.add_argument("--prompt-file", help="one prompt per line")
    g = GenerateConfig()
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=g.temperature)
    p.add_argument("--top-p", type=float, default=g.top_p)
    p.add_argument("--top-k", type=int, default=g.top_k)
    p.add_argument("--seed", type=int, default=g.seed)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")
    p.add_argument("--speculative", action="store_true",
                   help="the routed model drafts, the same weights verify dense: the dense model's output (needs routers)")
    p.add_argument("--draft-tokens", help=f"tokens drafted per round with --speculative: K >= 1 or 'auto' (default {g.draft_tokens})")
    p.add_argument("--masked", action="store_true",
                   help="compute every module and multiply by the gate (the reference the skipping path must match)")
    p.add_argument("--json", help="write texts and sparsity here")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise SkipGPTError(f"cannot read --prompt-file: {err}") from None
    if not prompts:
        raise SkipGPTError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    if args.draft_tokens is not None and not args.speculative:
        raise SkipGPTError("--draft-tokens sets speculative decoding: add --speculative")
    draft = parse_draft_tokens(GenerateConfig.draft_tokens if args.draft_tokens is None else args.draft_tokens)
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat,
                         speculative=args.speculative, draft_tokens=draft, routing="masked" if args.masked else "argmax")
    model, tokenizer = routed_model(args)
    result = generate(model, tokenizer, prompts, cfg)
    for prompt, text in zip(prompts, result.texts):
        print(f"### {prompt}\n{text}\n")
    rows = [("new tokens", result.new_tokens), ("tokens/s", f"{result.new_tokens / result.seconds:.1f}")]
    if result.speculative:
        rows += [("acceptance rate", pct(result.speculative["acceptance_rate"])),
                 ("mean accepted length", f"{result.speculative['mean_accepted_length']:.2f}")]
    if result.sparsity:
        who = "draft: " if result.speculative else ""  # speculative output is the dense model's
        rows += [(f"{who}parameter ratio skipped", pct(result.sparsity["param_ratio"])), (f"{who}module sparsity", pct(result.sparsity["module_sparsity"])),
                 (f"{who}attention / MLP skipped", f"{pct(result.sparsity['attn_sparsity'])} / {pct(result.sparsity['mlp_sparsity'])}")]
    print(table(["field", "value"], rows))
    out = {"prompts": prompts, "texts": result.texts, "generate": cfg.to_dict(), "new_tokens": result.new_tokens,
           "seconds": round(result.seconds, 3), "sparsity": result.sparsity, "speculative": result.speculative,
           "model": args.model, "routers": args.routers}
    if args.json:
        write_json(Path(args.json), out)
    return out

"""Running an analysis end to end: validate the router sets, load the model, compute (analysis.py),
draw (plots.py) and write the figure with the JSON behind it. ``skipgpt analyze`` is this with
options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SkipGPTError
from ..files import write_json
from ..lora import load_adapter
from ..routing.save_load import load_routers
from ..routing.surgery import detach_routers, has_routers
from . import analysis, plots
from .report import pct, table

ModelLoader = Callable[[], tuple[Any, Any]]


def router_label(info: dict[str, Any]) -> str:
    target = "" if info["target"] is None else f", target {pct(info['target'])}"
    return f"routers {info['routers']} ({info['method']}{' + LoRA' if info['adapter'] else ''}{target})"



def ppl_curve(specs: Sequence[str], dataset: str, methods: Sequence[str] | None) -> dict[str, Any]:
    """Figure 7: perplexity against ratio from saved evaluation results (no model needed)."""
    result = analysis.ppl_points(specs, dataset, methods)
    context = f"{', '.join(result['models']) or 'model not recorded'}; {dataset}; from {len(result['points'])} result(s)"
    protocols = {(p.get("windows"), p.get("seq_len")) for p in result["points"]}
    if len(protocols) == 1 and None not in next(iter(protocols)):
        context += " (first {} windows of {} tokens)".format(*next(iter(protocols)))
    return {**result, "context": context}


def learning_curve(specs: Sequence[str], dataset: str) -> dict[str, Any]:
    """Perplexity against training tokens from saved evaluations of routed models."""
    result = analysis.learning_points(specs, dataset)
    protocols = {(p.get("windows"), p.get("seq_len")) for p in result["points"]}
    context = f"{', '.join(result['models']) or 'model not recorded'}; {dataset}"
    if len(protocols) == 1 and None not in next(iter(protocols)):
        context += " (first {} windows of {} tokens)".format(*next(iter(protocols)))
    return {**result, "context": context}


def check_router_sets(kind: str, router_dirs: Sequence[str], carries_routers: bool) -> None:
    """Fail on a wrong number of router sets before anything is loaded."""
    if (kind == "sparsity-split" or (kind != "cosine" and not carries_routers)) and not router_dirs:
        raise SkipGPTError(f"{kind} needs --routers DIR (a directory from 'skipgpt tune')")
    if kind in ("routing", "context-shift") and len(router_dirs) > 1:
        raise SkipGPTError(f"{kind} takes one router directory; sparsity-split compares several")


def routed_analysis(kind: str, model_name: str, load: ModelLoader, router_dirs: Sequence[str], text: str, description: str,
                    *, seq_len: int, num_seqs: int, offset: int, window: int) -> dict[str, Any]:
    """Figures 2, 5, 6 and the routing map: ``text`` through the model loaded by ``load``, with each
    router set of ``router_dirs`` (sparsity-split compares several; the others take one)."""
    infos = [analysis.router_set_info(d) for d in router_dirs]  # validates them before the model loads
    model, tokenizer = load()
    if router_dirs and has_routers(model):
        raise SkipGPTError(f"{model_name} carries its own routers (an exported model); omit --routers")
    ids = analysis.text_sequences(tokenizer, text, seq_len, num_seqs, offset)
    where = f"{ids.numel()} tokens of {description}" + (f" from token {offset}" if offset else "")
    context = f"model {model_name}"
    if kind == "cosine":
        result = analysis.cosine_analysis(model, ids[0], analysis.token_strings(tokenizer, ids[0].tolist()))
        context += f"; {where}" + ("; routers play no part (every module executes)" if router_dirs else "")
    elif kind == "sparsity-split":
        rows = []
        for info in infos:
            if has_routers(model):
                detach_routers(model)
            load_routers(model, info["routers"])
            routed = load_adapter(model, info["adapter"]) if info["adapter"] else model
            print(f"skipgpt: {router_label(info)}", file=sys.stderr)
            rows.append({**info, **analysis.sparsity_split(routed, ids)})
            if info["adapter"]:  # LoRA was injected into this model's layers: start from a clean one
                model, tokenizer = load()
        rows.sort(key=lambda r: (r["target"] is None, r["target"] or 0.0, r["name"]))
        result = {"kind": "sparsity-split", "router_sets": rows}
        context += f"; {where}"
        print(table(["router set", "method", "target", "attention skipped", "MLP skipped", "params skipped"], [
            (r["routers"], r["method"] + (" + LoRA" if r["adapter"] else ""), pct(r["target"]), pct(r["attn_sparsity"]),
             pct(r["mlp_sparsity"]), pct(r["param_ratio"])) for r in rows]))
    else:
        info = infos[0] if infos else None
        if info:
            load_routers(model, info["routers"])
            model = load_adapter(model, info["adapter"]) if info["adapter"] else model
        context += f", {router_label(info) if info else 'its own routers'}; {where}"
        if kind == "routing":
            result = analysis.routing_analysis(model, ids[0], analysis.token_strings(tokenizer, ids[0].tolist()))
        else:
            result = analysis.context_shift(model, ids, window)
        result["router_set"] = info
    return {**result, "model": model_name, "context": context}


def write_figure(kind: str, result: dict[str, Any], png: Path, json_path: Path) -> None:
    plots.PLOTS[kind](result, png, result["context"])
    write_json(json_path, result)

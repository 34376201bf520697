"""The paper's routing analyses (SkipGPT section 6 and appendix D): pure computations.

Each function takes a model (and token ids) or result files and returns a JSON-ready dict;
``skipgpt.evaluation.plots`` draws them and ``skipgpt analyze KIND`` runs both.

* :func:`cosine_analysis` (figure 2): ``cos(x, x + f(x))`` per token and module, every module
  executing.
* :func:`routing_analysis`: which modules each token executes under argmax routing, and the
  compute (share of modules and of routable parameters) each token uses.
* :func:`sparsity_split` (figure 5): attention versus MLP sparsity of one router set.
* :func:`context_shift` (figure 6): attention and MLP execute ratio in a sliding window as the
  context grows.
* :func:`ppl_points` (figure 7): perplexity versus sparsity, read from existing result files.

Module index m = 2·layer + (0 for attention, 1 for MLP), as everywhere in skipgpt.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..data import tokenize
from ..devices import input_device
from ..errors import SkipGPTError
from ..lora import ADAPTER_CONFIG
from ..routing.save_load import CONFIG_NAME, read_router_config
from ..routing.save_load import router_dir as resolve_router_dir
from ..routing.surgery import (
    attach_routers,
    detach_routers,
    gate_mode,
    has_routers,
    measure_sparsity,
    observe_dense,
    routing_state,
)



# ---------------------------------------------------------------------------------------------
# Inputs


def module_labels(num_modules: int) -> list[str]:
    """``L0 attn``, ``L0 MLP``, ``L1 attn``, ... for the 2L routable modules."""
    return [f"L{m // 2} {'attn' if m % 2 == 0 else 'MLP'}" for m in range(num_modules)]


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token as text (whitespace made visible), or its id if the tokenizer cannot decode."""
    decode = getattr(tokenizer, "decode", None)
    out = []
    for i in ids:
        text = decode([int(i)]) if decode is not None else str(int(i))
        out.append(text.replace("\n", "\\n").replace("\t", "\\t") if text.strip() else repr(text))
    return out


def text_sequences(tokenizer: Any, text: str, seq_len: int, num_seqs: int = 1, offset: int = 0) -> torch.Tensor:
    """Up to ``num_seqs`` consecutive, non-overlapping sequences [N, seq_len] of ``text``'s tokens
    (no special tokens), starting ``offset`` tokens in; one shorter sequence if the text is short."""
    if seq_len < 1 or num_seqs < 1 or offset < 0:
        raise SkipGPTError("--seq-len and --num-seqs must be at least 1 and --offset at least 0")
    ids = tokenize(tokenizer, text)[offset:]
    if ids.numel() == 0:
        raise SkipGPTError(f"the text has no tokens after offset {offset}")
    n = min(num_seqs, ids.numel() // seq_len)
    if n == 0:
        return ids[None]
    return ids[: n * seq_len].view(n, seq_len)


def _device(model: torch.nn.Module) -> torch.device:
    return input_device(model)


@contextlib.contextmanager
def temporary_routers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model with routers: its own if it has some, else fresh ones removed afterwards."""
    if has_routers(model):
        yield model
        return
    attach_routers(model)
    try:
        yield model
    finally:
        detach_routers(model)


# ---------------------------------------------------------------------------------------------
# Figure 2: token-wise cosine similarity


@torch.no_grad()
def token_cosine(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``cos(x, x + f(x))`` for every token and module, every module executing: [B, T, 2L]."""
    ids = ids[None] if ids.dim() == 1 else ids
    with temporary_routers(model):
        cosines = torch.zeros(*ids.shape, routing_state(model).num_modules)
        row = [-1]

        def observe(index: int, x: torch.Tensor, update: torch.Tensor) -> None:
            row[0] += index == 0  # module 0 opens each sequence's forward
            cosines[row[0], :, index] = torch.nn.functional.cosine_similarity(x.float(), (x + update).float(), dim=-1)[0].cpu()

        observe_dense(model, ids, observe, batch_size=1)
    return cosines


def cosine_analysis(model: torch.nn.Module, ids: torch.Tensor, tokens: Sequence[str] | None = None,
                    redundant_above: float = 0.8, important_below: float = 0.6) -> dict[str, Any]:
    """Figure 2 for one sequence ``ids`` [T]: cosine [T][2L] plus the paper's two read-outs, the
    number of tokens for which each module is redundant (cos > ``redundant_above``) and the number
    of important modules (cos < ``important_below``) each token has."""
    ids = ids.flatten()
    cos = token_cosine(model, ids)[0]
    return {
        "kind": "cosine",
        "shape": "cosine[token][module]; module m = 2*layer + (0 attention, 1 MLP)",
        "modules": module_labels(cos.shape[1]),
        "token_ids": ids.tolist(),
        "tokens": list(tokens) if tokens is not None else [str(int(i)) for i in ids],
        "cosine": cos.tolist(),
        "mean_per_module": cos.mean(0).tolist(),
        "redundant_above": redundant_above,
        "redundant_tokens_per_module": (cos > redundant_above).sum(0).tolist(),
        "important_below": important_below,
        "important_modules_per_token": (cos < important_below).sum(1).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Routing map and per-token compute


@torch.no_grad()
def argmax_gates(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Execute decisions (1 = runs) of argmax routing: [B, T, 2L], one forward per sequence."""
    ids = ids[None] if ids.dim() == 1 else ids
    state = routing_state(model)
    rows = []
    with gate_mode(model, "argmax"):
        for b in range(ids.shape[0]):
            model(input_ids=ids[b : b + 1].to(_device(model)), use_cache=False)
            rows.append(state.stacked_gates()[:, 0].T.float().cpu())
    return torch.stack(rows)


def routing_analysis(model: torch.nn.Module, ids: torch.Tensor, tokens: Sequence[str] | None = None) -> dict[str, Any]:
    """Which modules each token of ``ids`` [T] executes, and the compute it uses."""
    ids = ids.flatten()
    gates = argmax_gates(model, ids)[0]  # [T, 2L]
    state = routing_state(model)
    params = state.module_params.double()
    # A skipped module still costs its replacement, if the router set has one; every router runs.
    param_frac = (gates.double() @ params + (1 - gates.double()) @ state.replacement_params.double()
                  + state.router_params.double().sum()) / params.sum()
    return {
        "kind": "routing",
        "shape": "executed[token][module] in {0, 1}; module m = 2*layer + (0 attention, 1 MLP)",
        "modules": module_labels(gates.shape[1]),
        "module_params": params.long().tolist(),
        "token_ids": ids.tolist(),
        "tokens": list(tokens) if tokens is not None else [str(int(i)) for i in ids],
        "executed": gates.long().tolist(),
        "module_fraction_executed": gates.mean(1).tolist(),
        "param_fraction_executed": param_frac.tolist(),
        "attn_sparsity": float(1 - gates[:, 0::2].mean()),
        "mlp_sparsity": float(1 - gates[:, 1::2].mean()),
        "module_sparsity": float(1 - gates.mean()),
        "param_ratio": float(1 - param_frac.mean()),
    }


# ---------------------------------------------------------------------------------------------
# Figure 5: attention versus MLP sparsity


@torch.no_grad()
def sparsity_split(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Argmax sparsity of the model's router set over the sequences ``ids`` [N, T]: attention,
    MLP, modules, parameter ratio, and per layer."""
    ids = ids[None] if ids.dim() == 1 else ids
    with gate_mode(model, "argmax"), measure_sparsity(model) as meter:
        for b in range(ids.shape[0]):
            model(input_ids=ids[b : b + 1].to(_device(model)), use_cache=False)
        return meter.summary()


def _find_target(config: dict[str, Any], results: dict[str, Any]) -> tuple[float | None, str | None]:
    for block in (config.get("training") or {}, (config.get("training") or {}).get("joint") or {},
                  results.get("tune") or {}, (results.get("finetune") or {}).get("joint") or {}):
        if isinstance(block, dict) and block.get("target") is not None:
            return float(block["target"]), block.get("target_unit")
    return None, None


def router_set_info(router_dir: str | Path) -> dict[str, Any]:
    """What a router directory is: method, target sparsity (from ``router_config.json`` or
    ``results.json``, following a stage-2 directory to the routers it started from), adapter."""
    path = resolve_router_dir(router_dir)
    config = read_router_config(path)
    results_path = path / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    training = config.get("training") or {}
    target, unit = _find_target(config, results)
    source = config.get("routers")
    if target is None and source and Path(source).is_dir() and Path(source).resolve() != path.resolve():
        target, unit = router_set_info(source)["target"], router_set_info(source)["target_unit"]
    routing = config["router"].get("routing", "skipgpt")
    if routing != "skipgpt":  # the dynamic baselines' routing (skipgpt compare)
        method = METHOD_NAMES.get(routing, routing)
    elif "training" not in config and config["router"].get("init") == "importance":
        method = "static cut"  # routers fixed to a Block-Influence module cut, no training
    elif training.get("mode") == "joint":
        method = "SkipGPT-Joint"
    elif training.get("mode") == "routed":
        method = "SkipGPT-RT-L"
    else:
        method = "SkipGPT-RT"
    return {
        "routers": str(router_dir),
        "name": path.name or str(path),
        "method": method,
        "target": target,
        "target_unit": unit,
        "adapter": str(path) if (path / ADAPTER_CONFIG).is_file() else None,
        "threshold": config["router"].get("threshold"),
    }


# ---------------------------------------------------------------------------------------------
# Figure 6: compute as the context grows


def sliding_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of every ``window`` consecutive entries along the last dimension: [..., T - window + 1]."""
    csum = torch.nn.functional.pad(values.double().cumsum(-1), (1, 0))
    return (csum[..., window:] - csum[..., :-window]) / window


def context_shift(model: torch.nn.Module, ids: torch.Tensor, window: int = 100) -> dict[str, Any]:
    """Attention and MLP execute ratios in a ``window``-token sliding window along each sequence
    of ``ids`` [N, T], averaged over the sequences (and their spread)."""
    ids = ids[None] if ids.dim() == 1 else ids
    if not 1 <= window <= ids.shape[1]:
        raise SkipGPTError(f"--window must be between 1 and the sequence length ({ids.shape[1]} tokens), got {window}")
    gates = argmax_gates(model, ids)  # [N, T, 2L]
    attn = sliding_mean(gates[..., 0::2].mean(-1), window)  # [N, T - w + 1]
    mlp = sliding_mean(gates[..., 1::2].mean(-1), window)
    return {
        "kind": "context-shift",
        "shape": "ratios[position]; position = index of the window's last token (0-based)",
        "window": window,
        "num_seqs": ids.shape[0],
        "seq_len": ids.shape[1],
        "positions": list(range(window - 1, ids.shape[1])),
        "attn_ratio": attn.mean(0).tolist(),
        "mlp_ratio": mlp.mean(0).tolist(),
        "attn_ratio_std": attn.std(0, unbiased=False).tolist(),
        "mlp_ratio_std": mlp.std(0, unbiased=False).tolist(),
        "attn_ratio_overall": float(gates[..., 0::2].mean()),
        "mlp_ratio_overall": float(gates[..., 1::2].mean()),
    }


# ---------------------------------------------------------------------------------------------
# Figure 7: perplexity versus sparsity, from existing result files

RATIO_KEYS = ("ratio", "achieved_ratio", "param_ratio")
# Method ids of ``skipgpt compare`` rows, shown by their papers' names (others are kept as given).
METHOD_NAMES = {
    "skipgpt-rt": "SkipGPT-RT", "joint-layer-drop": "Joint Layer Drop", "shortgpt": "ShortGPT",
    "shortened-ppl": "Shortened LLaMA (PPL)", "shortened-taylor": "Shortened LLaMA (Taylor+)", "laco": "LaCo",
    "slicegpt": "SliceGPT", "llm-pruner": "LLM-Pruner", "mod-d": "MoD-D", "d-llm": "D-LLM",
}


def method_name(method: str) -> str:
    base, lora = (method[: -len(", LoRA")], " + LoRA") if method.endswith(", LoRA") else (method, "")
    return METHOD_NAMES.get(base, base) + lora


def _method_of_eval(data: dict[str, Any], path: Path) -> str:
    routers = data.get("routers")
    if not routers:
        return "dense + LoRA" if data.get("adapter") else "dense"
    for candidate in (resolve_router_dir(routers), path.parent):
        if (candidate / CONFIG_NAME).is_file():
            with contextlib.suppress(SkipGPTError):
                method = router_set_info(candidate)["method"]
                if method == "SkipGPT-RT" and data.get("adapter"):
                    method = "SkipGPT-RT-L"
                return "Joint Layer Drop" if method == "static cut" else method  # its criterion: Block Influence
    return "SkipGPT-RT-L" if data.get("adapter") else "SkipGPT-RT"


def _row_point(row: dict[str, Any], dataset: str, source: str) -> dict[str, Any]:
    ratio = next((row[k] for k in RATIO_KEYS if row.get(k) is not None), None)
    ppl = row.get("ppl", row.get(f"{dataset}_ppl"))
    if isinstance(ppl, dict):  # skipgpt compare: {"ppl": {dataset: value}}
        ppl = ppl.get(dataset, next(iter(ppl.values())) if len(ppl) == 1 else None)
    if ratio is None or ppl is None or "method" not in row:
        raise SkipGPTError(f"a row in {source} lacks method, a ratio ({'/'.join(RATIO_KEYS)}) or a {dataset} perplexity "
                           f"(ppl, ppl.{dataset} or {dataset}_ppl): {str(row)[:300]}")
    protocol = ((row.get("eval") or {}).get(dataset) or {}) if isinstance(row.get("eval"), dict) else {}
    return {"method": method_name(str(row["method"])), "ratio": float(ratio), "ppl": float(ppl), "source": source,
            "windows": protocol.get("windows"), "seq_len": protocol.get("seq_len")}


def ppl_points(specs: Sequence[str], dataset: str = "wikitext2", methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Points (method, ratio skipped, perplexity) from result files; ``LABEL=PATH`` names the
    method of every point in PATH. Accepted files:

    * ``skipgpt eval --json``: ``{"model", "routers", "adapter", "results": {dataset: {"ppl",
      "sparsity": {"param_ratio", ...}}}}``; one point, ratio = ``param_ratio`` (0 when dense);
      method from the router directory (SkipGPT-RT, -RT-L, -Joint, a static cut = Joint Layer Drop).
    * rows: a list, or ``{"rows": [...]}``, of ``{"method", "ratio" | "achieved_ratio" |
      "param_ratio", "ppl" | "<dataset>_ppl" | "ppl": {dataset: value}}`` (``skipgpt compare``'s
      ``comparison.json`` and ``row.json``; its method ids are shown by name, e.g. Joint Layer Drop).

    ``methods`` keeps only those methods (and ``dense``, the reference).
    """
    points: list[dict[str, Any]] = []
    models: set[str] = set()
    for spec in specs:
        label, _, name = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        path = Path(name)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise SkipGPTError(f"cannot read results file {name}: {err}") from None
        except ValueError as err:
            raise SkipGPTError(f"{name} is not JSON ({err})") from None
        found: list[dict[str, Any]] = []
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            results = data["results"]
            key = dataset if dataset in results else (next(iter(results)) if len(results) == 1 else None)
            if key is None or "ppl" not in results[key]:
                raise SkipGPTError(f"{name} has no perplexity for {dataset!r} (it has {', '.join(results) or 'none'}); pass --dataset")
            ratio = (results[key].get("sparsity") or {}).get("param_ratio", 0.0) if data.get("routers") else 0.0
            found.append({"method": _method_of_eval(data, path), "ratio": float(ratio), "ppl": float(results[key]["ppl"]),
                          "source": name, "routers": data.get("routers"), "adapter": data.get("adapter"),
                          "windows": results[key].get("windows"), "seq_len": results[key].get("seq_len")})
            if data.get("model"):
                models.add(str(data["model"]))
        elif isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("rows"), list)):
            for row in data if isinstance(data, list) else data["rows"]:
                found.append(_row_point(row, dataset, name))
                if row.get("model"):
                    models.add(str(row["model"]))
            if isinstance(data, dict) and data.get("model"):
                models.add(str(data["model"]))
        else:
            raise SkipGPTError(f"{name} is neither 'skipgpt eval --json' output nor a list of rows with method, ratio, ppl")
        for point in found:
            points.append({**point, "method": label or point["method"]})
    if methods:
        keep = {m.lower() for m in methods} | {method_name(m).lower() for m in methods} | {"dense"}
        points = [p for p in points if p["method"].lower() in keep]
    if not points:
        raise SkipGPTError("no results to draw: give --results FILE[,FILE...] (and --methods that occur in them)")
    return {
        "kind": "ppl-curve",
        "dataset": dataset,
        "models": sorted(models),
        "ratio": "share of routable parameters skipped (param_ratio)",
        "points": sorted(points, key=lambda p: (p["method"], p["ratio"])),
    }


# ---------------------------------------------------------------------------------------------
# Learning curve: perplexity against the tokens the routers were trained on


def _training_record(directory: Path) -> Path:
    """``results.json`` of the run that trained a router set: ``skipgpt calibrate`` writes a new
    directory without one and records where its routers came from."""
    record = directory / "results.json"
    if not record.exists() and (directory / CONFIG_NAME).exists():
        source = json.loads((directory / CONFIG_NAME).read_text()).get("recalibrated_from")
        if source:
            return _training_record(Path(source))
    return record


def learning_points(specs: Sequence[str], dataset: str = "wikitext2") -> dict[str, Any]:
    """Points (series, tokens trained, perplexity, ratio) from ``skipgpt eval --json`` files of
    routed models; the tokens and wall time come from each router set's ``results.json``.
    ``LABEL=PATH`` puts a point in series LABEL (default: its method); dense evaluations give
    the reference line."""
    curve = ppl_points(specs, dataset)
    points = []
    for point in curve["points"]:
        if not point.get("routers"):
            points.append({**point, "series": "dense", "tokens": None, "wall_s": None})
            continue
        results_path = _training_record(resolve_router_dir(point["routers"]))
        try:
            results = json.loads(results_path.read_text())
        except (OSError, ValueError) as err:
            raise SkipGPTError(f"{point['source']}: cannot read the training record {results_path} ({err})") from None
        points.append({**point, "series": point["method"], "tokens": int(results.get("tokens_trained", 0)),
                       "wall_s": results.get("wall_s")})
    if not any(p["tokens"] for p in points):
        raise SkipGPTError("a learning curve needs evaluations of routed models (skipgpt eval --routers ... --json)")
    return {**curve, "kind": "learning-curve", "points": sorted(points, key=lambda p: (p["series"], p["tokens"] or 0))}
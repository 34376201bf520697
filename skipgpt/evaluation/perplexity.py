"""Token-level perplexity by one protocol for dense, routed and pruned models.

Protocol (docs/method-choices.md, "Perplexity protocol"): tokenise the whole joined test text with no special tokens (no BOS),
cut it into non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is
dropped), and average the next-token NLL over every scored token: each window's first token
is context only, so ``windows × (seq_len − 1)`` tokens are scored.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data import load_source, tokenize
from ..devices import input_device
from ..errors import SkipGPTError
from ..next_token import sequence_nll
from ..routing.surgery import gate_mode, has_routers, measure_sparsity

BOS_NOTE = "no BOS; windows cut from one token stream, first token of each window unscored"


def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SkipGPTError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 1024,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity of ``text``; routed models use argmax routing and report their sparsity."""
    windows = windows_of(tokenize(tokenizer, text), seq_len, max_windows)
    device = input_device(model)
    routed = has_routers(model)
    total_nll, scored = 0.0, 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        meter = None
        if routed:
            stack.enter_context(gate_mode(model, "argmax"))
            meter = stack.enter_context(measure_sparsity(model))
        for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = batch.to(device)
            total_nll += sequence_nll(model, batch, reduction="sum").item()  # chunked: no [B, T, V] logits
            scored += batch[:, 1:].numel()
        sparsity = meter.summary() if meter is not None else None
    nll = total_nll / scored
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "scored_tokens": scored,
        "windows": windows.shape[0],
        "seq_len": seq_len,
        "bos": BOS_NOTE,
        "routed": routed,
        "sparsity": sparsity,
        "wall_s": time.perf_counter() - start,
    }


def evaluate_sets(model: torch.nn.Module, tokenizer: Any, specs: Sequence[str], *, split: str, data_dir: str | None,
                  seq_len: int, batch_size: int, max_windows: int | None, label: str) -> list[tuple[str, dict[str, Any]]]:
    """(row label, perplexity result with the data's description) for each data spec."""
    rows = []
    for spec in specs:
        source = load_source(spec, split, data_dir)
        r = perplexity(model, tokenizer, source.text(), seq_len=seq_len, batch_size=batch_size,
                       max_windows=max_windows, desc=f"{label} {spec}")
        rows.append((f"{label} / {spec}", {**r, "data": source.description}))
    return rows

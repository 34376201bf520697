"""Token-level perplexity by one protocol for dense, routed and pruned models.

Protocol (docs/method-choices.md, "Perplexity protocol"): tokenise the whole joined test text with no special tokens,
cut it into non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is
dropped), and average the next-token NLL over every scored token: each window's first token
is context only, so ``windows × (seq_len − 1)`` tokens are scored. Where the tokenizer's
convention is to start a text with BOS (Gemma, Llama 3: :func:`skipgpt.data.bos_token`), each window is
BOS and ``seq_len − 1`` text tokens, all scored; the result records which (``bos``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data import bos_token, cut_windows, load_source, tokenize
from ..devices import input_device
from ..errors import SkipGPTError
from ..next_token import sequence_nll
from ..routing.surgery import gate_mode, has_routers, measure_sparsity

def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None = None, bos: int | None = None) -> torch.Tensor:
    windows = cut_windows(ids, seq_len, bos, max_windows)
    if windows.shape[0] == 0:
        raise SkipGPTError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return windows


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
    bos = bos_token(tokenizer)
    windows = windows_of(tokenize(tokenizer, text), seq_len, max_windows, bos)
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
        "bos": bos is not None,  # each window started with the tokenizer's BOS
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

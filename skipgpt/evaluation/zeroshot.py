"""Zero-shot accuracy through lm-evaluation-harness, offline, for dense, routed, LoRA-recovered
and pruned models (any causal LM ``torch.nn.Module`` with a Hugging Face tokenizer).

The seven tasks of the SkipGPT paper's tables (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA) are lm-eval's *builtin* task definitions, unchanged except for where
their data comes from: prompts, answer choices, target delimiters and metrics are lm-eval's own.

The task table, the local file layouts and how they reach lm-eval offline are in
:mod:`skipgpt.evaluation.zeroshot_tasks`.

Metrics are those of the SkipGPT paper's Tables 1–2 (``PAPER_METRICS``): OBQA acc_norm,
WinoGrande acc, PIQA acc, HellaSwag acc_norm, BoolQ acc, ARC-E acc_norm, ARC-C acc_norm (note:
the paper's header says AccNorm for ARC-E too, where many papers report acc). Every metric lm-eval
computes (acc and acc_norm where defined) is kept in the result as well.

Sparsity and padding: for loglikelihood requests lm-eval's ``HFLM`` right-pads a batch with token
id 0 and calls the model with no attention mask. Right padding never changes the logits of real
tokens (causal attention), but a routed model would count padding positions in its sparsity and
run their modules. :class:`_MaskedHFLM` therefore records the length of every sequence in the
batch as lm-eval pads it (it wraps ``pad_and_concat`` for the duration of the loglikelihood call)
and passes the corresponding ``attention_mask`` to the model. The routing hooks take the real
tokens from that mask (``skipgpt.routing.forward``), so padding neither runs a module nor counts towards
the reported sparsity; dense models get the same mask, so dense and routed runs differ only in
routing. The sparsity is measured with :func:`skipgpt.routing.surgery.measure_sparsity` under argmax
routing, per task and over all tasks.

lm-eval's ``wikitext`` task reports word perplexity over whole documents; skipgpt's perplexity
(``skipgpt.evaluation.perplexity``) is token perplexity over fixed windows and is separate from this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import bos_token
from ..errors import SkipGPTError
from ..files import read_kept, write_json
from ..routing.surgery import gate_mode, has_routers, measure_sparsity, routing_state
from .report import pct, table
from .zeroshot_tasks import PAPER_METRICS, TASKS, cache_root, find_task_files, prepare_task_data, task_config

DEFAULT_BATCH_SIZE = 8


def _masked_lm_class():
    from lm_eval.models import huggingface as hf
    from lm_eval.models.huggingface import HFLM

    if not hasattr(hf, "pad_and_concat"):
        raise SkipGPTError("this lm-eval's HFLM no longer pads through pad_and_concat; install lm-eval==0.4.13")

    class _MaskedHFLM(HFLM):
        """HFLM that passes the attention mask of lm-eval's right padding to the model (module docstring)."""

        _pending_mask: torch.Tensor | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            original = hf.pad_and_concat

            def recording(max_length, tensors, padding_side="right"):
                lengths = [t.shape[-1] for t in tensors]
                out = original(max_length, tensors, padding_side=padding_side)
                pos = torch.arange(out.shape[1])
                lens = torch.tensor(lengths)[:, None]
                mask = pos[None, :] < lens if padding_side == "right" else pos[None, :] >= out.shape[1] - lens
                self._pending_mask = mask.to(device=out.device, dtype=torch.long)
                return out

            hf.pad_and_concat = recording
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                hf.pad_and_concat = original
                self._pending_mask = None

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
            mask, self._pending_mask = self._pending_mask, None
            if attn_mask is not None or labels is not None or mask is None or mask.shape != inps.shape or bool(mask.all()):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(input_ids=inps, attention_mask=mask).logits

    return _MaskedHFLM


def sample_indices(task: str, n_docs: int, size: int, seed: int = 0) -> list[int]:
    """A fixed, seeded subset of a task's documents, sorted. Seeded by task name and seed through
    ``random.Random(str)`` (SHA-512 of the string, independent of ``PYTHONHASHSEED``), so every row of a
    comparison, in any process or sitting, scores the same examples; the first N documents would
    not do, since several tasks' files are ordered (by source article, by difficulty)."""
    if size < 1:
        raise SkipGPTError(f"a zero-shot sample needs at least 1 example per task, got {size}")
    if size >= n_docs:
        return list(range(n_docs))
    return sorted(random.Random(f"skipgpt-zeroshot:{task}:{seed}").sample(range(n_docs), size))


def _count_docs(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _examples(samples: list[dict[str, Any]], metric: str) -> dict[str, list]:
    """Per example (``samples`` in document order): its document index, whether it was right by the
    paper's metric, and how many choices it had (the chance level of that example). Kept so that
    rows scored on the same examples can be compared paired (skipgpt.evaluation.scoreboard)."""
    return {"doc_ids": [int(x["doc_id"]) for x in samples], "correct": [float(x[metric]) for x in samples],
            "n_choices": [len(x["filtered_resps"]) for x in samples]}


def _meter_delta(state: Any, skipped: torch.Tensor, tokens: int) -> dict[str, Any]:
    meter = state.new_meter()
    meter.skipped, meter.tokens = skipped.clone(), tokens
    return meter.summary()


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool):
    """lm-eval logs every request batch and config detail at INFO/WARNING; keep errors only."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    loglikelihoods: bool = False,
    resume_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` ("all", "piqa,hellaswag" or a list).

    Returns ``{task: {"metric", "value", "stderr", "n", "limit", "sample", "metrics", "data",
    "sparsity", "examples", "wall_s"}, ..., "sparsity": over all tasks (None for a model without
    routers), "average": mean of the reported values, "skipped": {task: why}}``. ``limit`` takes
    the first N examples of each task (lm-eval's ``limit``); ``sample`` a seeded subset of N
    (:func:`sample_indices`; the whole task where it has fewer), the same for every model.
    ``examples`` holds each scored example's index, correctness and number of choices. Routed models run with argmax routing (skipped modules
    are not computed); their previous gate mode is restored afterwards. ``loglikelihoods=True``
    adds each task's per-example log-likelihood of every choice (lm-eval's responses, doc order).
    ``resume_dir``: each finished task is written there as it finishes and taken from there by a
    later call with the same examples, so an evaluation stopped part-way (a scoreboard row's quarter
    of an hour of tasks) resumes at the task it was in. The directory must hold results of this
    very model only; the caller clears it when the model changes (skipgpt.baselines.compare).
    """
    if limit is not None and sample is not None:
        raise SkipGPTError("give either limit (the first N examples) or sample (a seeded subset of N), not both")
    present, skipped = find_task_files(tasks, data_dir)
    for message in skipped.values():
        print(f"skipgpt: {message}", file=sys.stderr)
    cache = cache_root(cache_dir)
    data_files = {name: prepare_task_data(name, paths, cache) for name, paths in present.items()}

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    routed = has_routers(model)
    bos = bos_token(tokenizer) is not None
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_lm_eval(verbose))
        yaml_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skipgpt-lmeval-")))
        for name, path in data_files.items():
            (yaml_dir / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, path, cache / "hf_datasets"), sort_keys=False))
        manager = TaskManager(include_defaults=False, include_path=str(yaml_dir))
        lm = _masked_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        meter = None
        if routed:
            stack.enter_context(gate_mode(model, "argmax"))
            meter = stack.enter_context(measure_sparsity(model))
        for name in data_files:
            setting = {"limit": limit, "sample": sample, "seed": sample_seed, "data": [str(p) for p in present[name]],
                       "bos": bos, "loglikelihoods": loglikelihoods}
            saved = _finished_task(resume_dir, name, setting)
            if saved is not None:
                out[name] = saved["result"]
                if meter is not None:  # the ratio over all tasks counts the finished ones' tokens too
                    meter.skipped += torch.tensor(saved["skipped"], dtype=meter.skipped.dtype)
                    meter.tokens += saved["tokens"]
                continue
            before = (meter.skipped.clone(), meter.tokens) if meter is not None else None
            n_docs = _count_docs(data_files[name])
            indices = None if sample is None else sample_indices(name, n_docs, sample, sample_seed)
            start = time.perf_counter()
            res = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                  samples=None if indices is None else {name: indices}, log_samples=True,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
            wall = time.perf_counter() - start
            samples = sorted(res["samples"][name], key=lambda x: x["doc_id"])
            scores = res["results"][name]
            metric = PAPER_METRICS[name]
            metrics = {k.split(",")[0]: v for k, v in scores.items() if "," in k and isinstance(v, (int, float))}
            stderr = metrics.get(f"{metric}_stderr")
            out[name] = {
                "metric": metric,
                "value": metrics[metric],
                "stderr": stderr if isinstance(stderr, float) and math.isfinite(stderr) else None,
                "n": int(res["n-samples"][name]["effective"]),
                "limit": limit,
                "sample": None if sample is None else {"size": len(indices), "seed": sample_seed, "of": n_docs},
                "metrics": metrics,
                "data": [str(p) for p in present[name]],
                "sparsity": None if meter is None else _meter_delta(routing_state(model), meter.skipped - before[0], meter.tokens - before[1]),
                "examples": _examples(samples, metric),
                "wall_s": round(wall, 2),
                "bos": bos,  # lm-eval follows the tokenizer's default: BOS before each context where it adds one
            }
            if loglikelihoods:
                out[name]["loglikelihoods"] = [[float(r[0]) for r in x["filtered_resps"]] for x in samples]
            if out[name]["n"] != len(out[name]["examples"]["doc_ids"]):
                raise SkipGPTError(f"lm-eval scored {out[name]['n']} {name} examples but logged "
                                   f"{len(out[name]['examples']['doc_ids'])}; this lm-eval version is not supported (install lm-eval==0.4.13)")
            if resume_dir is not None:
                write_json(Path(resume_dir) / f"{name}.json", {
                    "setting": setting, "result": out[name],
                    "skipped": None if meter is None else (meter.skipped - before[0]).tolist(),
                    "tokens": 0 if meter is None else meter.tokens - before[1]})
        out["sparsity"] = meter.summary() if meter is not None else None
    values = [out[name]["value"] for name in data_files]
    out["average"] = sum(values) / len(values)
    out["skipped"] = skipped
    return out


def _finished_task(resume_dir: str | os.PathLike | None, name: str, setting: dict[str, Any]) -> dict[str, Any] | None:
    """A task an earlier call finished on the same examples (``resume_dir``); a file written for
    another sample, limit or data is ignored and overwritten."""
    return None if resume_dir is None else read_kept(Path(resume_dir) / f"{name}.json", setting)


def task_names(results: dict[str, Any]) -> list[str]:
    return [k for k in results if k in TASKS]


def report(results: dict[str, Any], label: str = "") -> str:
    """Markdown table of :func:`evaluate_tasks`' result: one row per task, then the average."""
    rows = []
    for name in task_names(results):
        r = results[name]
        s = r.get("sparsity") or {}
        rows.append([f"{label} / {name}" if label else name, r["metric"], 100 * r["value"],
                     "" if r["stderr"] is None else f"± {100 * r['stderr']:.2f}", r["n"],
                     pct(s.get("param_ratio")) if s else "", f"{pct(s.get('attn_sparsity'))} / {pct(s.get('mlp_sparsity'))}" if s else "",
                     f"{r['wall_s']:.0f} s"])
    s = results.get("sparsity") or {}
    rows.append([f"{label} / average" if label else "average", "", 100 * results["average"], "", "",
                 pct(s.get("param_ratio")) if s else "", f"{pct(s.get('attn_sparsity'))} / {pct(s.get('mlp_sparsity'))}" if s else "", ""])
    return table(["model / task", "metric", "score (%)", "stderr", "n", "param ratio skipped", "attn / MLP skipped", "eval time"], rows)

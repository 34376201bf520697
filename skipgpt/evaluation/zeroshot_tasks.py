"""The seven zero-shot tasks of the SkipGPT paper, fed to lm-evaluation-harness from local files.

How it stays offline:

1. Each task's local files (under the data directory, ``--data-dir`` / ``$SKIPGPT_DATA_DIR``,
   see :data:`TASKS` for the file names) are converted by a small loader into the fields lm-eval's
   builtin task reads from its Hugging Face dataset (e.g. PIQA ``goal, sol1, sol2, label``), and
   written as JSON lines into the skipgpt cache (``$SKIPGPT_CACHE/zeroshot``; rebuilt when a source
   file changes).
2. For each task a YAML file is generated that ``include:``-s lm-eval's builtin YAML for it and
   overrides only the dataset fields: ``dataset_path: json``, ``dataset_kwargs.data_files`` (the
   converted file, under the split the builtin task evaluates), ``dataset_name: null`` and the
   unused training / validation / test splits set to null. lm-eval's ``TaskManager`` indexes that
   directory (only it, so the builtin task name such as ``piqa`` is unambiguous) and
   ``simple_evaluate`` runs it with ``HFLM(pretrained=<model instance>, tokenizer=...)``.
   ``datasets`` reads the file with its packaged ``json`` builder, so no hub access is needed
   (``HF_DATASETS_OFFLINE=1`` works).

Preprocessing differences from lm-eval on its hub data (forced by the local file layouts):

* HellaSwag: the local file is a derived text format (klosax/hellaswag_text_data) that stores
  ``activity_label + ": " + ctx`` already cleaned. lm-eval builds the context from
  ``ctx_a + " " + ctx_b.capitalize()``; the file no longer separates ``ctx_a`` from ``ctx_b``, so
  the first word of ``ctx_b`` is **not capitalised** here (e.g. "... on a roof. he" where lm-eval
  has "... on a roof. He"). lm-eval's own cleaning (``[title]`` → ". ", removal of any ``[...]``,
  double spaces) is still applied on top, by its builtin ``process_docs``.
* WinoGrande: the local file is MosaicML's converted layout (both contexts with the option filled
  in, the continuation after "_", the gold index). It is mapped to fields for which lm-eval's
  builtin ``doc_to_choice`` / ``doc_to_target`` give back exactly those two contexts and that
  continuation (``sentence = "_ " + continuation``, ``option1/2`` = the two full contexts), so the
  scored strings are lm-eval's as long as MosaicML's contexts equal ``sentence[:idx] + option``.
* OpenBookQA: the choices are parsed out of the official TSV's ``(A) … (B) … (C) … (D) …`` column
  (each choice stripped).
* BoolQ ``label`` "true"/"false" → 1/0; PIQA labels come from ``valid-labels.lst``; ARC's AI2
  layout ``question.stem`` / ``question.choices`` → ``question`` / ``choices.{text,label}``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data import DATA_DIR_ENV
from ..data import data_dir as resolve_data_dir
from ..errors import SkipGPTError

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class ZeroShotTask:
    """One lm-eval builtin task fed from local files."""

    builtin_dir: str  # lm-eval's task folder holding the builtin YAML
    files: tuple[str, ...]  # relative to the data directory; the first is the main file
    split: str  # the split the builtin task evaluates (named as in its YAML)
    metric: str  # what the SkipGPT paper reports
    convert: Callable[[list[Path]], list[dict[str, Any]]]
    notes: str


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SkipGPTError(f"{path}:{n} is not JSON ({err})") from None
    return rows


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bad(path: Path, what: str) -> SkipGPTError:
    return SkipGPTError(f"{path} is not in the expected layout: {what}")


def convert_boolq(paths: list[Path]) -> list[dict[str, Any]]:
    """SuperGLUE ``val.jsonl`` (question, passage, idx, label true/false) → super_glue/boolq fields."""
    out = []
    for row in _jsonl(paths[0]):
        label = row.get("label")
        if isinstance(label, str):
            label = {"true": 1, "false": 0}.get(label.lower())
        if label not in (0, 1, True, False) or "question" not in row or "passage" not in row:
            raise _bad(paths[0], f"each row needs question, passage, label true/false; got {sorted(row)}")
        out.append({"question": row["question"], "passage": row["passage"], "idx": row.get("idx", len(out)), "label": int(label)})
    return out


def convert_piqa(paths: list[Path]) -> list[dict[str, Any]]:
    """``valid.jsonl`` (goal, sol1, sol2) + ``valid-labels.lst`` (0/1 per line) → piqa fields."""
    rows, labels = _jsonl(paths[0]), _lines(paths[1])
    if len(rows) != len(labels):
        raise _bad(paths[1], f"{len(labels)} labels for {len(rows)} rows of {paths[0].name}")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)} for r, label in zip(rows, labels)]


def convert_hellaswag(paths: list[Path]) -> list[dict[str, Any]]:
    """klosax's ``hellaswag_val_full.txt.bz2``: 6 lines per task (``activity_label: ctx``, gold,
    4 endings) → Rowan/hellaswag fields. ``ctx_a`` holds the whole context and ``ctx_b`` is empty
    (the file does not separate them), so lm-eval's ``process_docs`` reproduces the file's text."""
    with bz2.open(paths[0], "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _bad(paths[0], f"{len(lines)} lines, not a multiple of 6")
    out = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise _bad(paths[0], f"task at line {i + 1} has no 'activity_label: ctx' line or no gold 0-3")
        out.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                    "endings": endings, "split": "val", "label": gold})
    return out


def convert_winogrande(paths: list[Path]) -> list[dict[str, Any]]:
    """MosaicML's converted rows (context_options[2], continuation, gold) → winogrande fields such
    that lm-eval's builtin functions give back exactly those contexts and that continuation."""
    out = []
    for row in _jsonl(paths[0]):
        options, cont, gold = row.get("context_options"), row.get("continuation"), row.get("gold")
        if not (isinstance(options, list) and len(options) == 2 and isinstance(cont, str) and gold in (0, 1)):
            raise _bad(paths[0], "each row needs context_options (2), continuation and gold 0/1")
        out.append({"sentence": "_ " + cont.strip(), "option1": options[0], "option2": options[1], "answer": str(gold + 1)})
    return out


def convert_arc(paths: list[Path]) -> list[dict[str, Any]]:
    """AI2 ARC jsonl (id, question{stem, choices[{text, label}]}, answerKey) → allenai/ai2_arc fields."""
    out = []
    for row in _jsonl(paths[0]):
        try:
            q = row["question"]
            choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
            out.append({"id": row["id"], "question": q["stem"], "choices": choices, "answerKey": row["answerKey"]})
        except (KeyError, TypeError):
            raise _bad(paths[0], "each row needs id, question.stem, question.choices[{text,label}], answerKey") from None
    return out


_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def convert_openbookqa(paths: list[Path]) -> list[dict[str, Any]]:
    """OpenBookQA ``Main/test.tsv`` (ID, Question Stem, Choices "(A) … (B) …", …, Answer Key) →
    allenai/openbookqa fields (id, question_stem, choices{text,label}, answerKey)."""
    out = []
    with paths[0].open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or header[:3] != ["ID", "Question Stem", "Choices"] or header[-1] != "Answer Key":
            raise _bad(paths[0], f"header must be ID, Question Stem, Choices, ..., Answer Key; got {header}")
        for row in reader:
            if not row:
                continue
            parts = _OBQA_CHOICE.split(row[2].strip())
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if parts[0].strip() or not labels or labels != [chr(ord("A") + k) for k in range(len(labels))] or row[-1].strip() not in labels:
                raise _bad(paths[0], f"choices of {row[0]} are not '(A) ... (B) ...' with the answer among them")
            out.append({"id": row[0], "question_stem": row[1], "choices": {"text": texts, "label": labels},
                        "answerKey": row[-1].strip()})
    return out


TASKS: dict[str, ZeroShotTask] = {
    # Order of the SkipGPT paper's tables.
    "openbookqa": ZeroShotTask("openbookqa", ("zeroshot/openbookqa/test.tsv",), "test", "acc_norm", convert_openbookqa,
                               "official OBQA-V1 Main TSV; choices parsed from '(A) … (D) …' and stripped"),
    "winogrande": ZeroShotTask("winogrande", ("zeroshot/winogrande/winogrande.jsonl",), "validation", "acc", convert_winogrande,
                               "MosaicML's converted dev set (1,267 rows); same scored strings as lm-eval's partial scoring"),
    "piqa": ZeroShotTask("piqa", ("zeroshot/piqa/valid.jsonl", "zeroshot/piqa/valid-labels.lst"), "validation", "acc", convert_piqa,
                         "official PIQA valid + labels file; no change"),
    "hellaswag": ZeroShotTask("hellaswag", ("zeroshot/hellaswag/hellaswag_val_full.txt.bz2",), "validation", "acc_norm",
                              convert_hellaswag, "derived text format; ctx_b not capitalised (see module docstring)"),
    "boolq": ZeroShotTask("super_glue/boolq", ("zeroshot/boolq/val.jsonl",), "validation", "acc", convert_boolq,
                          "SuperGLUE BoolQ val.jsonl; label true/false → 1/0"),
    "arc_easy": ZeroShotTask("arc", ("zeroshot/arc_easy/ARC-Easy-Test.jsonl",), "test", "acc_norm", convert_arc,
                             "AI2 ARC-V1 jsonl, test split; question.stem/choices flattened"),
    "arc_challenge": ZeroShotTask("arc", ("zeroshot/arc_challenge/ARC-Challenge-Test.jsonl",), "test", "acc_norm", convert_arc,
                                  "AI2 ARC-V1 jsonl, test split; question.stem/choices flattened"),
}
PAPER_METRICS = {name: task.metric for name, task in TASKS.items()}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"all"`` or a comma-separated string / list; unknown names are an error."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise SkipGPTError(f"unknown zero-shot task(s) {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def find_task_files(tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """({task: its files} for tasks whose files exist, {task: why it is skipped} for the others).

    Raises SkipGPTError when there is no data directory or none of the tasks has its files."""
    names = resolve_tasks(tasks)
    root = resolve_data_dir(data_dir)
    if root is None:
        raise SkipGPTError(f"zero-shot tasks are read from the data directory; pass --data-dir DIR or set {DATA_DIR_ENV}=DIR "
                           f"(it must contain e.g. {TASKS[names[0]].files[0]})")
    present, skipped = {}, {}
    for name in names:
        paths = [root / rel for rel in TASKS[name].files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            skipped[name] = f"skipping {name}: expected {' and '.join(missing)}, which does not exist"
        else:
            present[name] = paths
    if not present:
        raise SkipGPTError(f"none of the zero-shot tasks has its files under {root}: "
                           + "; ".join(skipped.values()) + f". Set {DATA_DIR_ENV} or --data-dir to the directory holding zeroshot/")
    return present, skipped


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        path = Path(cache_dir)
    else:
        from ..models import cache_dir as skipgpt_cache

        path = skipgpt_cache() / "zeroshot"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_task_data(name: str, paths: list[Path], cache: Path) -> Path:
    """Convert ``name``'s files into lm-eval's fields as a JSON-lines file in ``cache`` (reused
    while the source files and the converter are unchanged)."""
    stamp = json.dumps([CONVERTER_VERSION, name, *[(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]])
    out = cache / name / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.jsonl"
    if not out.is_file():
        rows = TASKS[name].convert(paths)
        if not rows:
            raise SkipGPTError(f"{paths[0]} holds no examples for {name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, out)
    return out


def _builtin_yaml(name: str) -> Path:
    """lm-eval's own YAML for ``name``, found by lm-eval's TaskManager in the task's folder
    (indexing only that folder: the full index takes seconds)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / TASKS[name].builtin_dir
    entry = TaskManager(include_defaults=False, include_path=str(folder)).task_index.get(name) if folder.is_dir() else None
    if entry is None or entry.yaml_path is None:
        raise SkipGPTError(f"this lm-eval has no builtin task {name!r} in {folder}; install lm-eval==0.4.13")
    return Path(entry.yaml_path)


def task_config(name: str, data_file: Path, hf_cache: Path) -> dict[str, Any]:
    """The YAML dict that includes lm-eval's builtin task and overrides only its dataset fields."""
    split = TASKS[name].split
    return {
        "include": str(_builtin_yaml(name)),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}, "cache_dir": str(hf_cache)},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }

"""Text sources and their tokenisation into fixed-length sequences.

A data spec is a named set (``wikitext2``, ``ptb``, ``c4``, resolved in the data directory),
a local ``.txt``/``.jsonl`` file, the builtin offline text ``pydoc``, or ``hf:NAME[:CONFIG[:SPLIT]]``
for a Hugging Face dataset when online. The data directory comes from ``--data-dir`` or
``$SKIPGPT_DATA_DIR``; nothing here knows where a particular checkout keeps it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import SkipGPTError

DATA_DIR_ENV = "SKIPGPT_DATA_DIR"


@dataclass(frozen=True)
class NamedSet:
    """A named corpus: one relative path per split, and how its lines join into one text."""

    splits: dict[str, str]
    joiner: str
    description: str
    strip_lines: bool = False


NAMED_SETS: dict[str, NamedSet] = {
    # HF wikitext-2-raw-v1 rows are the file's lines, whitespace-only lines as "";
    # the standard protocol (GPTQ, ShortGPT, SkipGPT) joins the rows with "\n\n".
    "wikitext2": NamedSet(
        {"test": "wikitext2/wiki.test.raw", "valid": "wikitext2/wiki.valid.raw"},
        "\n\n",
        "WikiText-2 raw; rows joined with '\\n\\n' as in the HF wikitext-2-raw-v1 protocol",
    ),
    # PTB (Mikolov) sentences joined with a space, as the GPTQ/SparseGPT evaluation does.
    "ptb": NamedSet(
        {"test": "ptb/ptb.test.txt", "valid": "ptb/ptb.valid.txt", "train": "ptb/ptb.train.txt"},
        " ",
        "Penn Treebank (Mikolov); stripped sentences joined with ' ' as in the GPTQ protocol",
        strip_lines=True,
    ),
    "c4": NamedSet({"train": "corpus/c4_sample.jsonl"}, "\n\n", "C4 en sample, one document per row"),
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SkipGPTError(f"{path}:{n} is not a JSON object with a {field!r} field") from None
    return rows


def _read_lines(path: Path) -> list[str]:
    # Universal newlines: the shared WikiText-2 copies have CRLF line endings.
    with path.open(encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise SkipGPTError(f"data file {path} does not exist; pass an existing .txt or .jsonl file")
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_lines(path)


def pydoc_documents() -> list[str]:
    """Python's own documentation topics: text that ships with every Python, so the demo
    runs with no data directory and no network. Technical English, not web text."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@dataclass
class TextSource:
    """Documents of one split of one source, and the words for reports."""

    documents: list[str]
    joiner: str
    description: str

    def text(self) -> str:
        return self.joiner.join(self.documents)


def _split_documents(docs: list[str], split: str) -> list[str]:
    """Deterministic disjoint split of a single-file corpus: every 10th document is held out
    ("test"/"valid"), the rest is "train", so an evaluation split is never trained on."""
    held_out = split in ("test", "valid")
    return [d for i, d in enumerate(docs) if (i % 10 == 9) == held_out]


def load_source(spec: str, split: str = "test", data_dir_path: str | os.PathLike | None = None) -> TextSource:
    """Documents for ``spec`` (see module docstring); raises SkipGPTError with a fix on failure."""
    if spec in NAMED_SETS:
        named = NAMED_SETS[spec]
        if split not in named.splits:
            raise SkipGPTError(f"{spec} has no {split!r} split here; available: {', '.join(named.splits)}")
        root = data_dir(data_dir_path)
        if root is None:
            raise SkipGPTError(
                f"{spec!r} is read from the data directory; pass --data-dir DIR or set {DATA_DIR_ENV}=DIR "
                f"(it must contain {named.splits[split]})"
            )
        path = root / named.splits[split]
        if not path.is_file():
            raise SkipGPTError(f"{spec!r} needs {path}, which does not exist; check --data-dir / {DATA_DIR_ENV}")
        docs = _read_file(path)
        if named.strip_lines:  # the HF ptb_text_only loader strips each sentence
            docs = [d.strip() for d in docs]
        source = TextSource(docs, named.joiner, f"{named.description} [{path}]")
    elif spec == "pydoc":
        docs = _split_documents(pydoc_documents(), split)
        source = TextSource(docs, "\n\n", f"Python documentation topics (pydoc_data), {split} split (every 10th topic held out)")
    elif spec.startswith("hf:"):
        source = _load_hf(spec, split)
    else:
        path = Path(spec)
        if not path.exists():
            raise SkipGPTError(
                f"data {spec!r} is neither a named set ({', '.join([*NAMED_SETS, 'pydoc'])}), "
                "'hf:NAME', nor an existing file"
            )
        source = TextSource(_read_file(path), "\n\n", str(path))
    if not any(d.strip() for d in source.documents):
        raise SkipGPTError(f"data {spec!r} ({split}) contains no text")
    return source


def _load_hf(spec: str, split: str) -> TextSource:
    name, config, hf_split = (spec[3:].split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise SkipGPTError("'hf:' data needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=hf_split or split)
    except Exception as err:  # offline, unknown name, ...: all need the same advice
        raise SkipGPTError(f"could not load {spec} ({err}); offline, use a local .txt/.jsonl file") from None
    return TextSource(list(ds["text"]), "\n\n", spec)


def tokenize(tokenizer: Callable, text: str) -> torch.Tensor:
    """Token ids of ``text`` with no special tokens added (BOS handling is the caller's).

    Whole corpora are longer than the model's context by design (windows are cut afterwards),
    hence ``verbose=False`` to silence transformers' length warning."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id where the tokenizer's own convention starts every text with it (Gemma: its
    checkpoints need it; Llama 3), else None (SmolLM2, Qwen: no BOS). Windows for perplexity and
    training then start with it, as the model saw text in pretraining."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("", add_special_tokens=True)["input_ids"]  # nothing but what the convention adds
    except (TypeError, ValueError, KeyError):  # a minimal tokenizer (tests): no convention to follow
        return None
    return bos if ids and ids[0] == bos else None


def cut_windows(stream: torch.Tensor, seq_len: int, bos: int | None = None, limit: int | None = None) -> torch.Tensor:
    """Consecutive windows [N, seq_len] of a token stream (the tail shorter than one dropped); with
    ``bos``, each is BOS and then ``seq_len − 1`` tokens of the stream, so that every window is
    scored on as many tokens either way."""
    width = seq_len - 1 if bos is not None else seq_len
    n = stream.numel() // width
    if limit is not None:
        n = min(n, limit)
    windows = stream[: n * width].view(n, width)
    if bos is None:
        return windows
    return torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)


def _document_ids(tokenizer, documents: list[str]) -> list[list[int]]:
    """Each non-blank document's token ids, followed by EOS where the tokenizer has one."""
    eos = tokenizer.eos_token_id
    return [tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + ([eos] if eos is not None else [])
            for doc in documents if doc.strip()]


def pack_documents(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Training sequences [N, seq_len]: documents tokenised, joined with EOS, cut without padding."""
    ids = [t for doc in _document_ids(tokenizer, documents) for t in doc]
    n = len(ids) // seq_len
    if n == 0:
        raise SkipGPTError(f"the data has {len(ids)} tokens, fewer than one sequence of {seq_len}; use more text or a shorter --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


CALIB_SAMPLES = ("tail", "spread")


def _spread_order(n: int) -> list[int]:
    """Indices 0..n-1 in van der Corput order (1/2, 1/4, 3/4, 1/8, ...): any prefix is spread
    evenly over the whole range."""
    order, seen, k = [], set(), 1
    while len(order) < n and k < 64 * n:
        x, f, i = 0.0, 0.5, k
        while i:
            x, i, f = x + f * (i & 1), i >> 1, f / 2
        index = int(x * n)
        if index not in seen:
            seen.add(index)
            order.append(index)
        k += 1
    return order + [i for i in range(n) if i not in seen]


def _spread_split(docs: list[list[int]], need: int) -> tuple[list[int], list[int]] | None:
    """(training stream, held-out stream of at least ``need`` tokens) with whole documents held
    out from across the corpus; None where the corpus cannot spare them."""
    held, count = set(), 0
    for i in _spread_order(len(docs)):
        if count >= need:
            break
        held.add(i)
        count += len(docs[i])
    if count < need:
        return None
    train = [t for i, d in enumerate(docs) if i not in held for t in d]
    return train, [t for i in sorted(held) for t in docs[i]]


def training_sequences(
    tokenizer, documents: list[str], seq_len: int, calib_sequences: int, calib_seq_len: int, calib_sample: str = "tail"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training sequences [N, seq_len], calibration sequences [C, calib_seq_len]).

    Calibration text is held out from training, so that threshold calibration never sees
    evaluation text and never sees what routers fitted: the tail of the training corpus
    (``calib_sample="tail"``), or whole documents drawn evenly from across it (``"spread"``). Both
    start every sequence with BOS where the tokenizer's convention is to (:func:`bos_token`).
    """
    if calib_sample not in CALIB_SAMPLES:
        raise SkipGPTError(f"calib_sample must be one of {CALIB_SAMPLES}, got {calib_sample!r}")
    bos = bos_token(tokenizer)
    need = calib_sequences * (calib_seq_len - (bos is not None))
    if calib_sample == "spread" and need:
        split = _spread_split(_document_ids(tokenizer, documents), need)
        if split is not None and len(split[0]) >= 4 * seq_len:
            train, held = (torch.tensor(part, dtype=torch.long) for part in split)
            return cut_windows(train, seq_len, bos), cut_windows(held[:need], calib_seq_len, bos)
    stream = pack_documents(tokenizer, documents, 1).flatten()
    if need and stream.numel() - need >= 4 * seq_len:
        calib = cut_windows(stream[-need:], calib_seq_len, bos)
        stream = stream[:-need]
    else:
        calib = None
    train = cut_windows(stream, seq_len, bos)
    if train.shape[0] == 0:
        raise SkipGPTError(f"the data has {stream.numel()} tokens, fewer than one sequence of {seq_len}; use more text or a shorter --seq-len")
    return train, calib

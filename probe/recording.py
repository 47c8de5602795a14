"""`Recording`: what one forward pass (or one generate call) over a batch left behind.

Shapes (B batch, L layers, H query heads, Hkv key/value heads, S positions, D head_dim):
- tokens [B, S] int64 (all 0 for a call made from inputs_embeds, whose ids the model never saw),
  attention_mask [B, S] bool (True = real token)
- stats[name] [B, L, H, S] (per query; `colsum` is per key), with a trailing k for
  argmax / max_prob and a trailing n_offsets for offset_mass (see headscope.kernels.stats)
- patterns [B, nL, nH, S, S] for `pattern_layers` x `pattern_heads` only (optional; NaN for a
  layer that did not run, as its statistics are)
- head_out [B, nL, S, H, D]: per-head outputs z before the output projection (optional)
- q [B, nL, H, S, D], k / v [B, nL, Hkv, S, D] as the attention function saw them (post-RoPE)

Saved as one safetensors file whose header carries the JSON metadata; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headscope.kernels.stats import StatsRequest

from .errors import HeadIndexError, RecordingError
from .meta import ModelMeta

_TENSOR_FIELDS = ("tokens", "attention_mask", "patterns", "head_out", "q", "k", "v")
_FORMAT = "headscope.recording/1"


def _with_extension(path: Path) -> Path:
    """path + ".safetensors" unless it ends so already; appended, not swapped for a suffix, so
    that "tau_0.5" and "tau_0.25" stay two files."""
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


@dataclass
class Recording:
    """What `HeadscopeModel.record` left behind: tokens [B, S], attention_mask [B, S], stats[name]
    [B, L, H, S(, k)], and the optional patterns / head_out / q / k / v of the layers (and heads)
    listed in pattern_layers / pattern_heads / head_out_layers / qkv_layers (shapes: module docstring).
    Read them with `stat`, `pattern`, `z` and `head_mean`; `save` / `load` round-trip the whole of it."""

    meta: ModelMeta
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    request: StatsRequest = field(default_factory=StatsRequest)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    patterns: torch.Tensor | None = None
    pattern_layers: list[int] = field(default_factory=list)
    pattern_heads: list[int] = field(default_factory=list)
    head_out: torch.Tensor | None = None
    head_out_layers: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    qkv_layers: list[int] = field(default_factory=list)
    backend: str = "native"
    info: dict = field(default_factory=dict)

    # ---- access -------------------------------------------------------------------------
    def stat(self, name: str, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """stats[name], optionally for one layer ([B, H, S, ...]) or one head ([B, S, ...])."""
        if name not in self.stats:
            raise RecordingError(f"statistic {name!r} was not recorded; recorded: {sorted(self.stats)}. "
                                 "Ask for it in model.record(stats=StatsRequest(...)).")
        t = self.stats[name]
        if head is not None and layer is None:  # a head index means nothing without its layer
            raise HeadIndexError(f"stat({name!r}, head={head}) needs the layer too: stat(name, layer, head).")
        if layer is not None:
            self.meta.check_layer(layer)
            t = t[:, layer]
            if head is not None:
                self.meta.check_head(layer, head)
                t = t[:, head]
        return t

    def pattern(self, layer: int, head: int) -> torch.Tensor:
        """Attention probabilities [B, S, S] of one recorded head."""
        self.meta.check_head(layer, head)
        if self.patterns is None or layer not in self.pattern_layers or head not in self.pattern_heads:
            raise HeadIndexError(f"pattern of layer {layer} head {head} was not recorded (recorded layers "
                                 f"{self.pattern_layers}, heads {self.pattern_heads}).")
        return self.patterns[:, self.pattern_layers.index(layer), self.pattern_heads.index(head)]

    def z(self, layer: int) -> torch.Tensor:
        """Per-head outputs [B, S, H, D] of one layer."""
        self.meta.check_layer(layer)
        if self.head_out is None or layer not in self.head_out_layers:
            raise HeadIndexError(f"head outputs of layer {layer} were not recorded (recorded: {self.head_out_layers}).")
        return self.head_out[:, self.head_out_layers.index(layer)]

    def query_mask(self) -> torch.Tensor:
        """[B, S] bool: positions whose query statistics are meaningful (real tokens)."""
        return self.attention_mask.bool()

    def head_mean(self, name: str, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of a per-query statistic over real (or the given [B, S] bool) positions -> [L, H]."""
        t = self.stat(name).float()
        if t.dim() != 4:
            raise RecordingError(f"{name!r} has a trailing axis; index it before averaging.")
        m = self.query_mask() if positions is None else positions.bool() & self.query_mask()
        m = m[:, None, None, :].to(t.device)
        n = m.sum(dim=(0, 3)).clamp_min(1)
        return torch.where(m, t, torch.zeros_like(t)).sum(dim=(0, 3)) / n

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "Recording":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Recording(
            meta=self.meta, tokens=mv(self.tokens), attention_mask=mv(self.attention_mask), request=self.request,
            stats={k: mv(v) for k, v in self.stats.items()}, patterns=mv(self.patterns),
            pattern_layers=list(self.pattern_layers), pattern_heads=list(self.pattern_heads),
            head_out=mv(self.head_out), head_out_layers=list(self.head_out_layers), q=mv(self.q), k=mv(self.k),
            v=mv(self.v), qkv_layers=list(self.qkv_layers), backend=self.backend, info=dict(self.info))

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write one .safetensors file (tensors + JSON metadata in its header). Returns the path."""
        from safetensors.torch import save_file

        path = _with_extension(Path(path))
        _check_json_faithful(self.info, "info")
        tensors = {f"stats.{k}": v.detach().cpu().contiguous() for k, v in self.stats.items()}
        for f in _TENSOR_FIELDS:
            t = getattr(self, f)
            if t is not None:
                tensors[f] = t.detach().cpu().contiguous()
        header = {
            "format": _FORMAT, "meta": self.meta.to_dict(), "request": self.request.to_dict(),
            "pattern_layers": self.pattern_layers, "pattern_heads": self.pattern_heads,
            "head_out_layers": self.head_out_layers, "qkv_layers": self.qkv_layers,
            "backend": self.backend, "info": self.info,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"headscope": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path) -> "Recording":
        """Read a file written by `save`; the name given to `save` works too ("run" finds "run.safetensors")."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists() and _with_extension(path).exists():  # the name given to save()
            path = _with_extension(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("headscope", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise RecordingError(f"cannot read recording {path}: {exc}") from exc
        if not header or header.get("format") != _FORMAT:
            raise RecordingError(f"{path} is not a headscope recording (format {header and header.get('format')!r}).")
        stats = {k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")}
        return cls(
            meta=ModelMeta.from_dict(header["meta"]), request=StatsRequest.from_dict(header["request"]), stats=stats,
            pattern_layers=header["pattern_layers"], pattern_heads=header["pattern_heads"],
            head_out_layers=header["head_out_layers"], qkv_layers=header["qkv_layers"], backend=header["backend"],
            info=header["info"], **{f: tensors.get(f) for f in _TENSOR_FIELDS})


def _check_json_faithful(value, where: str) -> None:
    """Refuse what a JSON header would silently change on load (int keys become str, tuples lists)
    or cannot hold at all, naming the place."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecordingError(f"Recording.{where} has the key {k!r} ({type(k).__name__}); the saved "
                                     "header is JSON, whose keys are strings. Use str keys.")
            _check_json_faithful(v, f"{where}[{k!r}]")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_faithful(v, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise RecordingError(f"Recording.{where} is a {type(value).__name__}, which the JSON header cannot "
                             "hold unchanged; store str, int, float, bool, None, lists and str-keyed dicts.")

"""`ModelMeta`: the shape facts about a model that every analysis needs."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

from .errors import HeadIndexError

# Bidirectional encoders: every other architecture transformers loads for us is a causal decoder.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2", "mpnet",
                 "modernbert", "albert", "camembert")


def _index(x, what: str) -> int:
    """An integer index as a plain int: numpy and 0-d torch integers too (np.unravel_index gives
    those), but not bools or floats, which are more likely mistakes than indices."""
    try:
        if isinstance(x, bool):
            raise TypeError
        return operator.index(x)
    except TypeError:
        raise HeadIndexError(f"{what} must be an integer index, got {x!r} ({type(x).__name__}).") from None


@dataclass(frozen=True)
class ModelMeta:
    """Architecture facts. `sliding_windows[l]` is layer l's window (None = full attention)."""

    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    causal: bool
    max_positions: int | None
    sliding_windows: tuple = field(default_factory=tuple)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def check_layer(self, layer) -> int:
        layer = _index(layer, "layer")
        if not 0 <= layer < self.n_layers:
            raise HeadIndexError(f"layer {layer!r} out of range: {self.name} has layers 0..{self.n_layers - 1}.")
        return layer

    def check_head(self, layer, head) -> tuple[int, int]:
        layer = self.check_layer(layer)
        head = _index(head, "head")
        if not 0 <= head < self.n_heads:
            raise HeadIndexError(f"head {head!r} out of range: {self.name} has heads 0..{self.n_heads - 1} per layer.")
        return layer, head

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sliding_windows"] = list(self.sliding_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        d = dict(d)
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        return cls(**d)

    @classmethod
    def from_config(cls, config, name: str) -> "ModelMeta":
        """Read the facts from a transformers config (Llama family, Gemma, GPT-2, BERT, ...)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = _first(cfg, "num_hidden_layers", "n_layer")
        n_heads = _first(cfg, "num_attention_heads", "n_head")
        d_model = _first(cfg, "hidden_size", "n_embd")
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
        arch = (cfg.architectures or [cfg.model_type])[0] if getattr(cfg, "architectures", None) else cfg.model_type
        encoder = cfg.model_type in ENCODER_TYPES
        windows = _sliding_windows(cfg, n_layers)
        return cls(name=name, architecture=arch, n_layers=int(n_layers), n_heads=int(n_heads), n_kv_heads=int(n_kv),
                   head_dim=int(head_dim), d_model=int(d_model), vocab_size=int(cfg.vocab_size), causal=not encoder,
                   max_positions=_first(cfg, "max_position_embeddings", "n_positions", "n_ctx", default=None),
                   sliding_windows=windows)


def _first(cfg, *names, default=...):
    for n in names:
        val = getattr(cfg, n, None)
        if val is not None:
            return val
    if default is ...:
        raise AttributeError(f"config has none of {names}")
    return default


def _sliding_windows(cfg, n_layers: int) -> tuple:
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    if window is None:
        return tuple([None] * n_layers)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return tuple([window] * n_layers)

"""`HeadscopeModel`: a transformers model with its tokenizer, metadata, recorder and edit contexts."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch

from headscope.kernels.stats import StatsRequest

from .edits import LayerEdit
from .errors import InputError, ModelLoadError
from .meta import ModelMeta
from .native import ContextHook, ModelState, StopForward, bind, register
from .recorder import Recorder, _layers_arg, pattern_spec
from .recording import Recording

# Children that hold an attention layer's query projection, by architecture family.
_QUERY_PROJECTIONS = ("q_proj", "query", "c_attn", "qkv_proj", "Wqkv", "query_key_value", "qkv")


def find_attention_modules(hf: torch.nn.Module, n_layers: int) -> list[torch.nn.Module]:
    """The self-attention module of each layer, in layer order (the module that calls the
    attention function and owns the projections)."""
    found: dict[int, torch.nn.Module] = {}
    for _, m in hf.named_modules():
        idx = getattr(m, "layer_idx", None)
        if idx is None or getattr(m, "is_cross_attention", False):
            continue
        if any(hasattr(m, p) for p in _QUERY_PROJECTIONS):
            found.setdefault(int(idx), m)
    if sorted(found) != list(range(n_layers)):
        raise ModelLoadError(f"{type(hf).__name__}: found self-attention modules for layers {sorted(found)}, "
                             f"expected 0..{n_layers - 1}; this architecture is not supported yet.")
    return [found[i] for i in range(n_layers)]


# Children of an attention module that are its output projection (o_proj and its names elsewhere).
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "o", "wo", "Wo", "proj")


def attention_output_site(hf: torch.nn.Module, attention: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is a layer's attention output after the output projection: the
    attention module itself where it owns the projection (Llama, GPT-2, ...), else its sibling
    `output.dense` (BERT-style encoders keep the projection beside the self-attention module)."""
    if any(isinstance(getattr(attention, n, None), torch.nn.Module) for n in _OUTPUT_PROJECTIONS):
        return attention
    for parent in hf.modules():
        if any(child is attention for child in parent.children()):
            dense = getattr(getattr(parent, "output", None), "dense", None)
            if isinstance(dense, torch.nn.Linear):
                return dense
    raise ModelLoadError(f"{type(hf).__name__}: no output projection found beside {type(attention).__name__}, "
                         "so the attention output after it cannot be reached; this architecture is not "
                         "supported for attention-output edits.")


def check_length(meta: ModelMeta, n: int) -> None:
    """InputError for an empty input or one longer than the model's context."""
    if n == 0:
        raise InputError("empty prompt: the input has no tokens.")
    if meta.max_positions and n > meta.max_positions:
        raise InputError(f"input of {n} tokens is longer than {meta.name}'s context "
                         f"({meta.max_positions}); truncate it or pick a longer-context model.")


def tokenize_texts(tokenizer, texts, meta: ModelMeta, device, *, prepend_bos: bool = False,
                   padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Texts -> {"input_ids" [B, S], "attention_mask" [B, S]} on `device` (shared by every backend)."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer: pass tokenizer= to load_model, or give token ids.")
    if isinstance(texts, str):
        texts = [texts]
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("empty prompt: every text must contain at least one non-space character.")
    tok = tokenizer
    bos = tok.bos_token_id
    seqs = [tok(t)["input_ids"] for t in texts]
    if prepend_bos and bos is not None:
        seqs = [s if s and s[0] == bos else [bos] + s for s in seqs]
    S = max(len(s) for s in seqs)
    check_length(meta, S)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(seqs), S), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def left_padded_positions(hf, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids [B, S] counted from each row's first real token when some row is left-padded (as
    generate() does), else None. Without them a model with absolute position embeddings (GPT-2, BERT)
    sees a left-padded prompt at shifted positions and attends differently than to the prompt alone;
    rotary models are unaffected either way."""
    if attention_mask is None or bool(attention_mask[:, 0].all()):
        return None
    if "position_ids" not in inspect.signature(type(hf).forward).parameters:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class HeadscopeModel:
    """A loaded model ready for head analysis.

    Attributes:
        hf: the transformers model (use it as usual; `model(...)` forwards to it).
        tokenizer: its tokenizer (may be None for a bare model object).
        meta: `ModelMeta` (n_layers, n_heads, n_kv_heads, head_dim, causal, sliding windows, ...).
        attention_modules: each layer's self-attention module.
    """

    def __init__(self, hf: torch.nn.Module, tokenizer=None, name: str | None = None):
        register()
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.meta = ModelMeta.from_config(hf.config, name or getattr(hf, "name_or_path", None) or type(hf).__name__)
        self.attention_modules = find_attention_modules(hf, self.meta.n_layers)
        # One switchboard per transformers model: wrapping it again shares it, so the first wrapper
        # keeps recording and editing (a second state would take the attention modules from it).
        self.state = ModelState.of(hf)
        for layer, module in enumerate(self.attention_modules):
            bind(module, self.state, layer)

    def __repr__(self) -> str:
        m = self.meta
        return (f"HeadscopeModel({m.name!r}, {m.architecture}, {m.n_layers} layers x {m.n_heads} heads "
                f"({m.n_kv_heads} kv), head_dim {m.head_dim}, {'causal' if m.causal else 'bidirectional'}, "
                f"device={self.device}, dtype={self.dtype})")

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    # ---- inputs ---------------------------------------------------------------------------
    def tokenize(self, texts, *, prepend_bos: bool = False, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids" [B, S], "attention_mask" [B, S]} on the model's device.

        prepend_bos adds the tokenizer's BOS token when it does not add one itself.
        """
        return tokenize_texts(self.tokenizer, texts, self.meta, self.device, prepend_bos=prepend_bos,
                              padding_side=padding_side)

    def check_length(self, n: int) -> None:
        check_length(self.meta, n)

    def __call__(self, *args, **kwargs):
        """The transformers forward; None when a recording's `stop_after_layer` ended it early."""
        try:
            return self.hf(*args, **kwargs)
        except StopForward:
            return None

    def generate(self, *args, **kwargs):
        return self.hf.generate(*args, **kwargs)

    # ---- recording ------------------------------------------------------------------------
    def _check_bound(self, what: str) -> None:
        """InputError for a model whose attention headscope does not run (a pruned model)."""
        if self.state is None:
            raise InputError(f"cannot {what} on this model: its layers have their own head counts (a pruned "
                             "model), which headscope's statistics and edits do not handle. Use the original "
                             "model, with ablate_heads for the pruned heads.")

    @contextmanager
    def record(self, stats: StatsRequest | None = None, *, patterns=None, head_out=None, qkv=None,
               keyset: torch.Tensor | None = None, stop_after_layer: int | None = None,
               max_pattern_bytes: int | None = None) -> Iterator[Recording]:
        """Record what every head does during the forward / generate calls inside the block.

        Args:
            stats: which per-head statistics to compute for every head (`StatsRequest`).
            patterns: full attention patterns to keep: True (all layers and heads), a layer or list of
                layers, or {"layers": [...], "heads": [...]}. Refused with PatternMemoryError, before
                anything is allocated, when they would not fit in memory.
            head_out: layers (or True) whose per-head outputs z [B, S, H, D] to keep.
            qkv: layers (or True) whose q, k, v to keep.
            keyset: [B, S] bool key set for `keyset_mass`.
            stop_after_layer: skip the rest of the forward after this layer's attention (then
                `model(...)` returns None; a direct `model.hf(...)` call ends the block there,
                the recording still complete); for collecting activations cheaply. The statistics
                keep their [B, L, H, S] shape: layers after this one are NaN (argmax -1).
            max_pattern_bytes: memory budget for `patterns` (default: half of the free memory of
                the model's device).
        Yields:
            a `Recording` (shapes: headscope.probe.recording), filled when the block exits.
        """
        self._check_bound("record")
        request = stats or StatsRequest()
        if request.keyset and keyset is None:
            raise InputError("keyset_mass was requested: pass keyset=, a [B, S] bool mask of the key positions.")
        if stop_after_layer is not None:
            self.meta.check_layer(stop_after_layer)
        rec = Recording(meta=self.meta, tokens=torch.zeros(0, 0, dtype=torch.long),
                        attention_mask=torch.zeros(0, 0, dtype=torch.bool), request=request)
        recorder = Recorder(self.meta, self.device, request, pattern_spec(self.meta, patterns),
                            _layers_arg(self.meta, head_out, "head_out"), _layers_arg(self.meta, qkv, "qkv"),
                            keyset, stop_after_layer, max_pattern_bytes)
        if self.state.recorder is not None:
            raise InputError("a recording is already active on this model; recordings do not nest.")
        self.state.recorder = recorder  # the model's pre-hook (ModelState) now starts its segments
        try:
            with self.state.active():
                try:
                    yield rec
                except StopForward:
                    # model.hf(...) called directly under stop_after_layer: the recording is complete,
                    # and the block ends at that call (`model(...)` returns None instead).
                    pass
        finally:
            self.state.recorder = None
            self.state.release_caches()
        recorder.finish(rec)

    def run_recorded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     stats: StatsRequest | None = None, **record_kwargs) -> tuple[object, Recording]:
        """One forward pass under `record` -> (model output or None if stopped early, Recording)."""
        kwargs = {"position_ids": pos} if (pos := left_padded_positions(self.hf, attention_mask)) is not None else {}
        with self.record(stats, **record_kwargs) as rec, torch.no_grad():
            out = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out, rec

    # ---- interventions --------------------------------------------------------------------
    @contextmanager
    def edit_attention(self, edits: dict[int, LayerEdit]):
        """Apply `LayerEdit`s (layer -> edit) to every forward inside the block; removed on exit."""
        self._check_bound("edit attention")
        for layer, edit in edits.items():
            self.meta.check_layer(layer)
            if edit.head_mask is not None and edit.head_mask.shape != (self.meta.n_heads,):
                raise InputError(f"head_mask of layer {layer} must have shape [{self.meta.n_heads}].")
            if edit.value_delta is not None and edit.value_delta.shape[-2] != self.meta.n_heads:
                raise InputError(f"value_delta of layer {layer} must be [H, D] or [B, H, D] with H = "
                                 f"{self.meta.n_heads}, got {tuple(edit.value_delta.shape)}.")
        for layer, edit in edits.items():
            self.state.edits.setdefault(layer, []).append(edit)
        try:
            with self.state.active():
                yield self
        finally:
            for layer, edit in edits.items():
                lst = self.state.edits[layer]
                lst.remove(edit)
                if not lst:
                    del self.state.edits[layer]

    @contextmanager
    def add_to_attention_output(self, layer: int, vector: torch.Tensor, positions: torch.Tensor | None = None):
        """Add `vector` [d_model] (or one per example, [B, d_model]) to layer `layer`'s attention
        output (after the output projection) in every forward inside the block (memory injection);
        the hook is removed on exit.

        positions: None (every position) or a bool mask [S] or [B, S] over the positions of each
        forward call (during cached decoding a call covers only the new tokens).
        """
        self.meta.check_layer(layer)
        vector = torch.as_tensor(vector)
        if vector.dim() not in (1, 2) or vector.shape[-1] != self.meta.d_model:
            raise InputError(f"the vector added to the attention output must have shape [d_model] or "
                             f"[B, d_model] (d_model = {self.meta.d_model}), got {tuple(vector.shape)}.")
        if not torch.isfinite(vector).all():
            raise InputError("the vector added to the attention output has NaN or inf entries.")
        if positions is not None and (positions.dtype != torch.bool or positions.dim() not in (1, 2)):
            raise InputError("positions must be None or a bool mask [S] or [B, S].")

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            add = vector.to(out.device, out.dtype)
            if add.dim() == 2:
                if add.shape[0] != out.shape[0]:
                    raise InputError(f"{add.shape[0]} vectors for a batch of {out.shape[0]}.")
                add = add[:, None, :]
            if positions is None:
                out = out + add
            else:
                m = positions.to(out.device)
                if m.shape[-1] != out.shape[1] or (m.dim() == 2 and m.shape[0] != out.shape[0]):
                    raise InputError(f"positions mask {tuple(m.shape)} does not fit the attention output "
                                     f"[B, S] = [{out.shape[0]}, {out.shape[1]}].")
                m = m[None, :, None] if m.dim() == 1 else m[:, :, None]
                out = out + m.to(out.dtype) * add
            return (out, *output[1:]) if isinstance(output, tuple) else out

        site = attention_output_site(self.hf, self.attention_modules[layer])
        handle = site.register_forward_hook(ContextHook(hook))
        try:
            yield self
        finally:
            handle.remove()

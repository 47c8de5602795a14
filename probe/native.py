"""The native backend: an attention function registered in transformers' attention registry.

`model.set_attn_implementation("headscope")` routes every attention layer through
`headscope_attention`, which calls `headscope.kernels.attention` (Triton on CUDA, exact chunked
torch on CPU), applies the active `LayerEdit`s and hands statistics to the active recorder.
The implementation is switched on only while a recorder or an edit is active (`ModelState`),
so a model outside those contexts runs exactly as transformers would run it.

Inside an edit context, on CPU, a layer call that has nothing to record and no change to the
attention probabilities (zero ablation, z edits, or a layer no edit touches) runs torch's SDPA,
as transformers would: the same attention, rounded differently (about 1e-6), several times faster
on short inputs. Set `model.state.backend = "torch"` to force the exact chunked path everywhere.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import replace

import torch

from headscope.kernels import KeyBias, KeyScale, StatsRequest, attention
from headscope.kernels.errors import KernelInputError

from .call_args import bound_arguments, call_cache, call_length, past_length
from .edits import LayerEdit, add_value_delta, keys_of_call, merge_edits
from .errors import InputError, RecordingError

IMPL = "headscope"
_NO_STATS = StatsRequest()
# attention module -> (ModelState, layer index); weak so models can be garbage-collected.
_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_registered = False


class StopForward(Exception):
    """Raised after the last layer a recording needs, to skip the rest of the forward pass."""


def register() -> None:
    """Register the attention function and its mask function with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, headscope_attention)
    AttentionMaskInterface.register(IMPL, headscope_mask)
    _registered = True


def headscope_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """Pass only the 2-D padding mask on: causal and window structure is applied inside the kernel,
    so no [B, 1, Sq, Sk] mask is ever built."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


class ModelState:
    """Per-model switchboard: the active recorder, the active edits, and who turned the
    headscope attention implementation on (restored when the last user leaves).

    `seq_len`: tokens of the sequence so far (cache + this call), set before each forward while
    active; attention calls compare it with the keys they are given (sliding-window and static
    caches hand over fewer or more keys than the sequence has). `attention_mask`: that call's
    [B, S] padding mask (None when it has none), for edits that must know the real positions."""

    def __init__(self, hf):
        self.hf = hf
        self.recorder = None
        self.edits: dict[int, list[LayerEdit]] = {}
        self.backend = "auto"
        self.seq_len: int | None = None
        self.attention_mask: torch.Tensor | None = None  # the running call's [B, S] padding mask, if any
        self._users = 0
        self._saved_impl = None
        self._hooks = ()
        self._guarded: list = []  # caches the open recording follows
        self.attention_calls: int | None = None  # headscope_attention calls in the running model forward

    def __deepcopy__(self, memo):
        # A deep copy of the model is another model: it must not inherit this one's recorder, edits
        # and users (a copy made inside a context would keep an ablation forever). Its state is made
        # fresh when it is wrapped (`of` finds None); its attention modules are bound to no state.
        return None

    @classmethod
    def of(cls, hf) -> "ModelState":
        """The model's state, created on first use (kept on the model, so every wrapper shares it)."""
        state = cls.existing(hf)
        if state is None:
            state = cls(hf)
            hf.__dict__["_headscope_state"] = state  # a plain attribute: not a submodule, not saved
        return state

    @staticmethod
    def existing(hf) -> "ModelState | None":
        """The model's state if a HeadscopeModel wraps it, else None (creates nothing)."""
        return hf.__dict__.get("_headscope_state")

    @property
    def in_use(self) -> bool:
        """A recording or an edit is active: forwards must go through headscope_attention."""
        return self.recorder is not None or bool(self.edits)

    def _before_forward(self, module, args, kwargs):
        """The one pre-hook of the whole model: what the call is (length, padding), and for an open
        recording, a new segment or decode step (its cache then guarded, `guard_cache`)."""
        self.attention_calls = 0
        call = bound_arguments(module, args, kwargs)
        ids, batch, n_new = call_length(call)
        cache = call_cache(call)
        n_past = past_length(cache)
        self.seq_len = n_past + n_new if n_new >= 0 else None
        mask = call.get("attention_mask")
        self.attention_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if _packed(call, mask, cache, self.hf.config):
            raise InputError(
                "packed sequences (position_ids that restart inside a row, no attention_mask, no cache): "
                "transformers keeps the documents of a row apart with a block mask, which headscope's "
                "attention does not apply (causal, window and padding only), so they would see each other. "
                "Put one document per row, padded, with the tokenizer's attention_mask.")
        if self.recorder is None:
            return
        if n_new < 0:
            raise InputError("the model was called without input_ids or inputs_embeds.")
        if cache is not None and id(cache) not in _GUARDED:
            guard_cache(cache)
            self._guarded.append(cache)
        self.recorder.begin_call(ids, mask, n_new, batch, n_past)

    def release_caches(self) -> None:
        """Lift the guards of the caches the closing recording followed."""
        for cache in self._guarded:
            _GUARDED.discard(id(cache))
        self._guarded = []

    def _forget_length(self, module, args, output):
        calls, self.attention_calls = self.attention_calls, None
        self.seq_len = self.attention_mask = None
        # output is None when the forward raised (StopForward included): that error stands. A model
        # switched to another implementation on purpose (a copy run as transformers would) is left alone.
        # So is a deep copy made inside a context (it carries a copy of this state, bound to no module).
        if (output is not None and calls == 0 and self.in_use and self.hf.config._attn_implementation == IMPL
                and any(s is self for s, _ in _MODULES.values())):
            raise RecordingError(
                f"{type(self.hf).__name__} ran a forward pass without calling headscope's attention function "
                "in any layer, so the active edits were not applied and nothing could be recorded: its "
                "attention modules were replaced or bypassed after load_model. TransformerLens' "
                "TransformerBridge.boot_transformers(hf_model=model.hf) does this; boot the bridge on a "
                "separate copy (load_model(...) again) and keep this model for edits and native recordings.")

    @contextmanager
    def active(self):
        if self._users == 0:
            self._saved_impl = self.hf.config._attn_implementation or "sdpa"
            self.hf.set_attn_implementation(IMPL)
            # seq_len holds only during a call of the whole model (a call of a submodule sees None)
            self._hooks = (self.hf.register_forward_pre_hook(ContextHook(self._before_forward), with_kwargs=True),
                           self.hf.register_forward_hook(ContextHook(self._forget_length), always_call=True))
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0:
                self.hf.set_attn_implementation(self._saved_impl)
                for h in self._hooks:
                    h.remove()
                self._hooks, self.seq_len, self.attention_mask = (), None, None

    def layer_edit(self, layer: int, H: int) -> LayerEdit | None:
        edits = self.edits.get(layer)
        return merge_edits(edits, H) if edits else None


def _packed(call: dict, mask, cache, config) -> bool:
    """True where transformers would treat the call as packed sequences (its `_preprocess_mask_arguments`:
    position_ids given, no attention_mask, no cache, and positions that do not step by one)."""
    pos = call.get("position_ids")
    if mask is not None or cache is not None or not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        return False
    use_cache = call.get("use_cache")
    if use_cache is None:
        use_cache = getattr(config, "use_cache", False)
    return not use_cache and pos.shape[-1] > 1 and bool((pos.diff(dim=-1) != 1).any())


class ContextHook:
    """A hook installed for the length of a context (a recording, an edit, an injection). A deep copy of
    the model made while it is installed (`prune` copies the model) gets a no-op in its place: the
    copy would otherwise keep the context's change forever, or drive this model's state."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __deepcopy__(self, memo):
        return _no_hook


def _no_hook(*args):
    return None


def bind(module: torch.nn.Module, state: ModelState, layer: int) -> None:
    _MODULES[module] = (state, layer)


def _last(t: torch.Tensor | None, Sk: int) -> torch.Tensor | None:
    """The last Sk positions of a [B, S] (or [B, H, S]) per-position tensor (the keys of this call)."""
    if t is None:
        return None
    if t.shape[-1] < Sk:
        raise KernelInputError(f"a [..., S] mask covers {t.shape[-1]} positions but the layer sees {Sk} keys.")
    return t[..., t.shape[-1] - Sk:]


_CACHE_OPS = ("reorder_cache", "crop", "batch_select_indices", "batch_repeat_interleave")
_GUARDED: set[int] = set()  # id() of the caches open recordings follow


def _refusing(name: str, original):
    def method(self, *args, **kwargs):
        if id(self) in _GUARDED:
            raise RecordingError(
                f"the KV cache's {name}() was called during a recording: beam search, assisted or "
                "contrastive generation reorder or crop the cache, and the recording (one row per token "
                "fed) would no longer match any returned sequence. Record greedy or sampled generation, "
                "or record one forward pass over the generated text.")
        return original(self, *args, **kwargs)

    method._headscope_original = original
    return method


def guard_cache(cache) -> None:
    """Make this cache object raise instead of reordering or cropping while a recording is open.

    The class's methods are wrapped once and refuse only for caches in `_GUARDED`: a copy of the
    cache, or the cache after the recording, behaves as transformers wrote it."""
    cls = type(cache)
    for name in _CACHE_OPS:
        original = getattr(cls, name, None)
        if original is not None and not hasattr(original, "_headscope_original"):
            setattr(cls, name, _refusing(name, original))
    _GUARDED.add(id(cache))


def _dropped_keys(seq_len: int, Sk: int, window) -> int:
    """How many keys a sliding-window cache dropped from the front of this call (its keys are the
    last Sk of seq_len). The attention call then takes them as key_start: every statistic indexed
    by position (argmax, colsum, patterns, sink, next_match's previous token) stays at sequence
    positions, while only the Sk keys given are read (the call checks that the dropped keys lie
    outside every query's window)."""
    if window is None:
        raise KernelInputError(f"the layer was given {Sk} keys for a sequence of {seq_len} tokens and has no "
                               "sliding window; headscope cannot place them. Record with the default "
                               "(dynamic) cache.")
    return seq_len - Sk


def _plain_attention_suffices(state, rec, edit, key_valid, window, softcap, causal, query, Sq, Sk) -> bool:
    """True when this call needs no statistics and no change to the attention probabilities: no
    recorder, at most zero-ablation or z edits, on CPU with the automatic backend, and a shape SDPA
    handles without a mask (no padding, window or softcap; all queries at once or one decode step)."""
    if rec is not None or query.is_cuda or (state is not None and state.backend != "auto"):
        return False
    if edit is not None and (edit.keys is not None or edit.value_keys is not None
                             or (edit.head_mask is not None and edit.head_mask_mode != "zero")):
        return False
    return key_valid is None and window is None and softcap is None and (Sq == Sk or Sq == 1 or not causal)


def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, Sq, D], key/value [B, Hkv, Sk, D] ->
    (output [B, Sq, H, D], None)."""
    entry = _MODULES.get(module)
    state, layer = entry if entry is not None else (None, None)
    if state is not None and state.recorder is not None and state.attention_calls is None:
        # The recorder starts a segment in the whole model's pre-hook; this layer's call would join
        # the previous call's rows (twice the tokens, colsum summed twice).
        raise RecordingError(
            f"layer {layer}'s attention ran inside model.record() without a call of the whole model "
            f"({type(state.hf).__name__}): a submodule (such as model.hf.model) was called directly. "
            "Call the model itself (model(...) or model.hf(...)) while recording; use "
            "output_hidden_states=True for hidden states.")
    if state is not None and state.attention_calls is not None:
        state.attention_calls += 1
    if dropout and module.training:
        raise KernelInputError("headscope attention has no dropout: call model.eval() (analyses run in eval mode).")
    B, H, Sq, _ = query.shape
    Sk = key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise KernelInputError("headscope attention takes a [B, S] padding mask, not a prepared 4-D mask; "
                               "pass the 2-D attention_mask that the tokenizer returns.")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    rec = state.recorder if state is not None else None
    edit = state.layer_edit(layer, H) if state is not None else None
    seq_len = state.seq_len if state is not None else None
    if seq_len is not None and Sk > seq_len:
        raise KernelInputError(
            f"the layer was given {Sk} keys for a sequence of {seq_len} tokens: a static cache "
            "(cache_implementation='static') hands over its empty slots too, and headscope places queries "
            "after the last key. Record or edit with the default dynamic cache.")
    key_start = _dropped_keys(seq_len, Sk, window) if rec is not None and seq_len is not None and Sk < seq_len else 0
    S = key_start + Sk  # per-key inputs and outputs span the sequence
    key_valid = _last(attention_mask, S)

    if _plain_attention_suffices(state, rec, edit, key_valid, window, kwargs.get("softcap"), causal, query, Sq, Sk):
        # Nothing to record and no edit of the attention itself (z edits, zero ablation, or edits on
        # other layers): transformers' own SDPA computes the same output, faster on short inputs.
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=causal and Sq > 1,
                                                               scale=scaling, enable_gqa=True)
        if edit is not None and edit.head_mask is not None:
            out = out.masked_fill(edit.head_mask.to(out.device)[None, :, None, None], 0.0)
    else:
        request = rec.request if rec is not None else _NO_STATS
        keyset = rec.key_set(S) if rec is not None and request.keyset else None
        if edit is not None and edit.value_keys is not None:
            if keyset is not None:
                raise InputError(
                    f"layer {layer} has a value edit, which uses the attention call's one key set, while the "
                    "recording asks for keyset_mass: record keyset_mass without the value edit, or the edited "
                    "run without keyset_mass.")
            keyset = keys_of_call(edit.value_keys.to(query.device), seq_len, S)
            if keyset.shape[0] not in (1, B):
                raise InputError(f"the value edit of layer {layer} has key positions for {keyset.shape[0]} examples; "
                                 f"this batch has {B}.")
            if keyset.shape[0] == 1 and B > 1:  # one key set for every example
                keyset = keyset.expand(B, -1).contiguous()
            request = replace(request, keyset=True)
        key_scale = key_bias = None
        if edit is not None and edit.keys is not None:
            keys = keys_of_call(edit.keys.to(query.device), seq_len, S)
            if edit.key_scale_beta is not None:
                key_scale = KeyScale(edit.key_scale_beta.to(query.device, torch.float32), keys)
            if edit.key_bias is not None:
                key_bias = KeyBias(edit.key_bias.to(query.device, torch.float32), keys)
        out, stats = attention(
            query, key, value, causal=causal, sm_scale=scaling, window=window, softcap=kwargs.get("softcap"),
            attention_mask=key_valid,
            token_ids=rec.key_tokens(S) if rec is not None and request.needs_tokens else None,
            keyset=keyset, stats=request,
            head_mask=edit.head_mask.to(query.device) if edit is not None and edit.head_mask is not None else None,
            head_mask_mode=edit.head_mask_mode if edit is not None else "zero", key_scale=key_scale, key_bias=key_bias,
            pattern_heads=rec.pattern_heads_for(layer) if rec is not None else None,
            backend=state.backend if state is not None else "auto", key_start=key_start)
        if edit is not None and edit.value_delta is not None:
            out = add_value_delta(out, stats.pop("keyset_mass"), edit.value_delta, layer)
    if edit is not None and edit.z_fn is not None:
        out = edit.z_fn(out, layer)
    if rec is not None:
        rec.add(layer, stats, out, query, key[:, :, Sk - Sq:], value[:, :, Sk - Sq:])
        if rec.stop_after_layer is not None and layer >= rec.stop_after_layer:
            raise StopForward()
    return out.transpose(1, 2).contiguous(), None

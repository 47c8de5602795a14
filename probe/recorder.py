"""`Recorder`: collects what the attention function reports, call by call, into a `Recording`.

One recorder may see several forward calls: a fresh forward starts a new segment; a forward
continuing a KV cache (generate's decode steps) appends query rows to the current one. Segments of
equal length are concatenated along the batch at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from headscope.kernels.stats import KEY_STATS, StatsRequest

from .edits import keys_of_call
from .errors import InputError, PatternMemoryError, RecordingError
from .meta import ModelMeta
from .recording import Recording

# Share of currently available memory that full patterns may take before we refuse.
_PATTERN_MEMORY_SHARE = 0.5
# Pattern bytes alive at the peak, per byte kept: the attention calls' blocks while they are copied
# into the assembled [B, L, H, S, S] tensor (each block is freed once copied), or the segments'
# assembled tensors while they are concatenated.
_PATTERN_PEAK_COPIES = 2


def available_bytes(device: torch.device) -> int:
    """Memory free on the device right now (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class PatternSpec:
    """Which full attention patterns to keep: layers x heads (None = all)."""

    layers: list[int]
    heads: list[int]


def _layers_arg(meta: ModelMeta, arg, what: str) -> list[int]:
    if arg is None or arg is False:
        return []
    if arg is True:
        return list(range(meta.n_layers))
    if isinstance(arg, int):
        arg = [arg]
    out = [meta.check_layer(int(x)) for x in arg]
    if not out:
        raise InputError(f"{what}: an empty layer list records nothing; pass None instead.")
    return sorted(set(out))


def pattern_spec(meta: ModelMeta, patterns) -> PatternSpec | None:
    """patterns: None/False, True (every head), a list of layers, or {"layers": [...], "heads": [...]}."""
    if patterns is None or patterns is False:
        return None
    if isinstance(patterns, dict):
        layers = _layers_arg(meta, patterns.get("layers", True), "patterns")
        heads = patterns.get("heads")
        heads = list(range(meta.n_heads)) if heads is None else [meta.check_head(layers[0], int(h))[1] for h in heads]
        return PatternSpec(layers, sorted(set(heads)))
    return PatternSpec(_layers_arg(meta, patterns, "patterns"), list(range(meta.n_heads)))


class Recorder:
    def __init__(self, meta: ModelMeta, device: torch.device, request: StatsRequest, patterns: PatternSpec | None,
                 head_out_layers: list[int], qkv_layers: list[int], keyset: torch.Tensor | None,
                 stop_after_layer: int | None, max_pattern_bytes: int | None):
        self.meta, self.device, self.request = meta, device, request
        self.patterns = patterns
        self.head_out_layers, self.qkv_layers = head_out_layers, qkv_layers
        self.keyset = keyset
        self.stop_after_layer = stop_after_layer
        self.max_pattern_bytes = max_pattern_bytes
        self._segments: list[dict] = []
        self._seg: dict | None = None

    # ---- called by the forward pre-hook ---------------------------------------------------
    def begin_call(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, seq_len: int,
                   batch: int, n_past: int) -> None:
        if seq_len == 0:
            raise InputError("empty prompt: the input has no tokens. Give at least one token.")
        total = n_past + seq_len
        if self.meta.max_positions and total > self.meta.max_positions:
            raise InputError(f"input of {total} tokens is longer than {self.meta.name}'s context "
                             f"({self.meta.max_positions}); truncate it or pick a longer-context model.")
        if self.request.needs_tokens and input_ids is None:
            raise InputError("match / next_match statistics compare token ids: call the model with input_ids, "
                             "not inputs_embeds.")
        continuing = n_past > 0 and self._seg is not None
        self._check_pattern_memory(batch, total, continuing)
        if n_past > 0 and self._seg is None:
            raise RecordingError("recording started in the middle of a cached generation: open model.record() "
                                 "before the first (prefill) forward.")
        if not continuing:
            if self._seg is not None:
                self._segments.append(self._seg)
            self._seg = {"tokens": None, "mask": None, "layers": {}, "batch": batch, "ids_known": True}
        seg = self._seg
        # The segment's tokens are known only if every call gave input_ids: a prefill from
        # inputs_embeds followed by decoding from ids would otherwise place the ids at position 0.
        seg["ids_known"] = seg["ids_known"] and input_ids is not None
        if seg["ids_known"]:
            ids = input_ids.to(self.device)
            seg["tokens"] = ids if not continuing else torch.cat([seg["tokens"], ids], 1)
        else:
            seg["tokens"] = None
        if attention_mask is not None:
            seg["mask"] = attention_mask.to(self.device).bool()[:, -total:]
        else:
            seg["mask"] = torch.ones(batch, total, dtype=torch.bool, device=self.device)
        seg["len"] = total

    def _check_pattern_memory(self, batch: int, total: int, continuing: bool) -> None:
        """Refuse before the forward when the patterns, at their assembly peak, exceed the budget.

        A decode step grows the current segment to `total` tokens; a new forward adds a segment."""
        if self.patterns is None:
            return
        need = self._pattern_size(batch, total)
        # the segments kept so far (the current one too, unless this call continues it)
        kept = self._segments + ([self._seg] if self._seg is not None and not continuing else [])
        before = sum(self._pattern_size(s["batch"], s["len"]) for s in kept)
        peak = (before + need) * _PATTERN_PEAK_COPIES
        budget = self.max_pattern_bytes
        if budget is None:
            budget = int(available_bytes(self.device) * _PATTERN_MEMORY_SHARE)
        if peak > budget:
            earlier = f" on top of {before / 2**30:.2f} GiB already recorded" if before else ""
            raise PatternMemoryError(
                f"full patterns for {len(self.patterns.layers)} layers x {len(self.patterns.heads)} heads at "
                f"batch {batch} x {total} tokens need {need / 2**30:.2f} GiB ({need} bytes){earlier}, and "
                f"{_PATTERN_PEAK_COPIES}x that while they are assembled, but only {budget / 2**30:.2f} GiB may "
                "be used. Record statistics instead (they are O(S)), or ask for fewer layers/heads or a "
                "shorter input.")

    def _pattern_size(self, batch: int, total: int) -> int:
        """Bytes of the float32 patterns [batch, layers, heads, total, total] one segment keeps."""
        return batch * len(self.patterns.layers) * len(self.patterns.heads) * total * total * 4

    # ---- called by the attention function -------------------------------------------------
    def key_tokens(self, Sk: int) -> torch.Tensor:
        return self._seg["tokens"][:, -Sk:]

    def key_set(self, Sk: int) -> torch.Tensor:
        return keys_of_call(self.keyset.to(self.device).bool(), self._seg["len"], Sk)

    def pattern_heads_for(self, layer: int) -> list[int] | None:
        if self.patterns is None or layer not in self.patterns.layers:
            return None
        return self.patterns.heads

    def add(self, layer: int, stats: dict, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        entry = self._seg["layers"].setdefault(layer, {"stats": [], "z": [], "q": [], "k": [], "v": []})
        entry["stats"].append({name: t.detach() for name, t in stats.items()})  # observations, not graph nodes
        if layer in self.head_out_layers and out is not None:  # external backends append z from their own hook
            entry["z"].append(out.transpose(1, 2).detach())
        if layer in self.qkv_layers:
            entry["q"].append(q.detach())
            entry["k"].append(k.detach())
            entry["v"].append(v.detach())

    # ---- assembly -------------------------------------------------------------------------
    def finish(self, into: Recording) -> Recording:
        segs = self._segments + ([self._seg] if self._seg is not None else [])
        if not segs:
            raise RecordingError("nothing was recorded: run the model inside `with model.record(...)`.")
        parts = [self._assemble(s) for s in segs]
        if len(parts) > 1 and len({p["tokens"].shape[1] for p in parts}) > 1:
            raise RecordingError("one recorder saw forward calls of different lengths "
                                 f"({[p['tokens'].shape[1] for p in parts]}); open one model.record() per batch "
                                 "or pad the batches to one length.")
        merged = {k: (torch.cat([p[k] for p in parts], 0) if parts[0][k] is not None else None) for k in parts[0]
                  if k != "stats"}
        stats = {n: torch.cat([p["stats"][n] for p in parts], 0) for n in parts[0]["stats"]}
        into.tokens = merged["tokens"]
        into.attention_mask = merged["mask"]
        into.stats = stats
        into.request = self.request
        into.patterns = merged["patterns"]
        into.pattern_layers = self.patterns.layers if self.patterns else []
        into.pattern_heads = self.patterns.heads if self.patterns else []
        into.head_out, into.head_out_layers = merged["z"], list(self.head_out_layers)
        into.q, into.k, into.v, into.qkv_layers = merged["q"], merged["k"], merged["v"], list(self.qkv_layers)
        into.info["layers_run"] = sorted(set().union(*(s["layers"].keys() for s in segs)))
        return into

    def _assemble(self, seg: dict) -> dict:
        B, S = seg["batch"], seg["len"]
        L, H = self.meta.n_layers, self.meta.n_heads
        layers = seg["layers"]
        stats = {}
        for name in self.request.names():
            per_layer = []
            for layer in range(L):
                calls = [c[name] for c in layers[layer]["stats"]] if layer in layers else []
                per_layer.append(_join_calls(name, calls, B, H, S, self.request, self.device))
            stats[name] = torch.stack(per_layer, 1)
        tokens = seg["tokens"] if seg["tokens"] is not None else torch.zeros(B, S, dtype=torch.long, device=self.device)
        patterns = None
        if self.patterns is not None:
            # Written in place, each call's block dropped once copied: the peak stays near 2x the kept
            # size (`_PATTERN_PEAK_COPIES`). Layers that never ran (stop_after_layer) are NaN, as
            # their statistics are, not rows of zeros that read as attention.
            patterns = torch.empty(B, len(self.patterns.layers), len(self.patterns.heads), S, S, device=self.device)
            for i, layer in enumerate(self.patterns.layers):
                if layer not in layers:
                    patterns[:, i] = float("nan")
                    continue
                _write_rows(patterns[:, i], [c.pop("pattern") for c in layers[layer]["stats"]])

        def cat(kind, layer_list, dim):
            if not layer_list:
                return None
            missing = [l for l in layer_list if l not in layers]
            if missing:
                raise RecordingError(f"layers {missing} did not run, so their {kind} could not be recorded.")
            return torch.stack([torch.cat(layers[l][kind], dim) for l in layer_list], 1)

        return {"tokens": tokens, "mask": seg["mask"], "stats": stats, "patterns": patterns,
                "z": cat("z", self.head_out_layers, 1), "q": cat("q", self.qkv_layers, 2),
                "k": cat("k", self.qkv_layers, 2), "v": cat("v", self.qkv_layers, 2)}


def _join_calls(name: str, calls: list, B: int, H: int, S: int, request: StatsRequest, device) -> torch.Tensor:
    """One layer's statistic over the calls of a segment -> [B, H, S, ...]; NaN if the layer never ran."""
    if not calls:
        trailing = {"argmax": (request.topk,), "max_prob": (request.topk,), "offset_mass": (len(request.offsets),)}
        shape = (B, H, S) + trailing.get(name, ())
        if name == "argmax":
            return torch.full(shape, -1, dtype=torch.int64, device=device)
        return torch.full(shape, float("nan"), device=device)
    if name in KEY_STATS:  # per key: later calls add their queries' attention to earlier keys
        total = torch.zeros(B, H, S, device=device)
        for c in calls:
            total[:, :, : c.shape[2]] += c
        return total
    return torch.cat(calls, 2)


def _write_rows(out: torch.Tensor, calls: list) -> None:
    """Pattern rows of successive calls into out [B, nh, S, S] (a call's rows end at its last key: the
    keys after it are the future, 0). Empties `calls` as it goes, so each block can be freed."""
    out.zero_()
    row = 0
    while calls:
        c = calls.pop(0)
        out[:, :, row: row + c.shape[2], : c.shape[3]] = c
        row += c.shape[2]
        del c


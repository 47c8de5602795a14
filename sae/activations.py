"""Activations for SAE training: a source that streams them from the model through the recorder,
and a store that holds them in shards (in memory, spilled to safetensors files past a budget) and
serves them back shuffled in a deterministic, resumable order.

Sites (d_in):
- "z": layer L's per-head outputs before the output projection, concatenated over heads
  [tokens, H * D], recorded with `model.record(head_out=[L], stop_after_layer=L)` so the forward
  stops after that layer's attention.
- "resid": the residual stream after block L [tokens, d_model] (TransformerLens' hook_resid_post),
  the output of the decoder block that holds layer L's attention, read by a forward hook (HF's
  `hidden_states[L + 1]` is the same except at the last layer, where it has the final norm applied).

Shuffling: each epoch permutes the shard order, takes `mix_shards` shards at a time, permutes
their tokens and cuts batches from that. Batch b of a run is a pure function of (seed, b), so a
resumed run only needs the batch index to continue exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from headscope.kernels.errors import HeadscopeError

SITES = ("z", "resid")
_FORMAT = "headscope.sae.activations/1"


class ActivationError(HeadscopeError, ValueError):
    """Activations that cannot be collected or read (bad site/layer, corrupt shard, mismatch)."""


def site_dim(meta, site: str) -> int:
    """d_in of a site for a model."""
    if site == "z":
        return meta.n_heads * meta.head_dim
    if site == "resid":
        return int(meta.d_model)
    raise ActivationError(f"unknown site {site!r}; use one of {SITES}.")


def hook_name(layer: int, site: str) -> str:
    """The TransformerLens / SAELens hook name of a site."""
    return f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_resid_post"


def model_activations(model, layer: int, site: str, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Activations [B, S, d_in] of one site for a token batch [B, S] (float32, on the model's device)."""
    model.meta.check_layer(layer)
    if site == "z":
        _, rec = model.run_recorded(input_ids, attention_mask, head_out=[layer], stop_after_layer=layer)
        z = rec.z(layer)
        return z.reshape(z.shape[0], z.shape[1], -1).float()
    if site == "resid":
        got = {}

        def keep(module, args, output):
            got["x"] = (output[0] if isinstance(output, tuple) else output).detach()

        handle = block_module(model, layer).register_forward_hook(keep)
        try:
            with torch.no_grad():
                model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        return got["x"].float()
    raise ActivationError(f"unknown site {site!r}; use one of {SITES}.")


def block_module(model, layer: int) -> torch.nn.Module:
    """The decoder block of `layer`: the ancestor of its attention module whose name ends in the layer
    index (model.layers.L for model.layers.L.self_attn, transformer.h.L for transformer.h.L.attn)."""
    attn = model.attention_modules[layer]
    name = next(n for n, m in model.hf.named_modules() if m is attn)
    parts = name.split(".")
    for j in range(len(parts) - 2, -1, -1):
        if parts[j] == str(layer):
            return model.hf.get_submodule(".".join(parts[: j + 1]))
    raise ActivationError(f"cannot find the block of layer {layer} (attention module {name!r}) to read "
                          "its residual stream output.")


def stream_activations(model, layer: int, site: str, batches: Iterable[torch.Tensor], *,
                       skip_first: bool = True) -> Iterator[torch.Tensor]:
    """[n, d_in] activations per token batch; the first position (BOS, whose activations are
    outliers that would dominate the loss) is left out when skip_first."""
    for ids in batches:
        a = model_activations(model, layer, site, ids.to(model.device))
        if skip_first:
            a = a[:, 1:]
        yield a.reshape(-1, a.shape[-1]).cpu()


@dataclass
class ActivationStore:
    """Activations in shards of `shard_tokens` rows [shard_tokens, d_in] float32.

    Shards live in memory until `max_memory_tokens` is reached, then every shard is written to
    `spill_dir` as `shard_{i:05d}.safetensors` (with `manifest.json`) and read back on demand.
    """

    d_in: int
    shard_tokens: int = 65536
    max_memory_tokens: int = 1 << 20
    spill_dir: Path | None = None
    info: dict = field(default_factory=dict)
    _shards: list = field(default_factory=list)  # tensors (in memory) or Paths (spilled)
    _pending: list = field(default_factory=list)
    _pending_n: int = 0

    # ---- filling ------------------------------------------------------------------------------
    def add(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ActivationError(f"expected activations [n, {self.d_in}], got {list(x.shape)}.")
        self._pending.append(x.float().contiguous())
        self._pending_n += x.shape[0]
        while self._pending_n >= self.shard_tokens:
            allx = torch.cat(self._pending)
            self._push(allx[: self.shard_tokens].clone())
            rest = allx[self.shard_tokens:]
            self._pending, self._pending_n = ([rest] if len(rest) else []), len(rest)

    def _push(self, shard: torch.Tensor) -> None:
        self._shards.append(shard)
        if any(isinstance(s, Path) for s in self._shards):  # already spilling: straight to disk
            self._shards[-1] = self._write_shard(len(self._shards) - 1, shard)
            self._write_manifest()
            return
        in_mem = sum(s.shape[0] for s in self._shards if isinstance(s, torch.Tensor))
        if in_mem > self.max_memory_tokens:
            if self.spill_dir is None:
                raise ActivationError(f"activations exceed max_memory_tokens={self.max_memory_tokens}: "
                                      "give spill_dir to write shards to disk.")
            self.spill_dir = Path(self.spill_dir)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            for i, s in enumerate(self._shards):
                if isinstance(s, torch.Tensor):
                    self._shards[i] = self._write_shard(i, s)
            self._write_manifest()

    def _write_shard(self, i: int, s: torch.Tensor) -> Path:
        p = self.spill_dir / f"shard_{i:05d}.safetensors"
        tmp = p.with_suffix(".tmp")
        save_file({"x": s}, str(tmp))
        os.replace(tmp, p)
        return p

    def finish(self) -> "ActivationStore":
        """Drop the incomplete last shard (keeps every shard the same size) and write the manifest."""
        self._pending, self._pending_n = [], 0
        if self.spill_dir is not None and any(isinstance(s, Path) for s in self._shards):
            self._write_manifest()
        return self

    def _write_manifest(self) -> None:
        m = {"format": _FORMAT, "d_in": self.d_in, "shard_tokens": self.shard_tokens,
             "n_shards": len(self._shards), "info": self.info}
        tmp = self.spill_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, self.spill_dir / "manifest.json")

    def save(self, directory) -> Path:
        """Write every shard and the manifest into `directory` (for caching between runs). Shards
        already spilled to another folder are copied there, so the folder holds the whole store."""
        self.spill_dir = Path(directory)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(self._shards):
            target = self.spill_dir / f"shard_{i:05d}.safetensors"
            if isinstance(s, torch.Tensor):
                self._shards[i] = self._write_shard(i, s)
            elif s.resolve() != target.resolve():
                tmp = target.with_suffix(".tmp")
                shutil.copyfile(s, tmp)
                os.replace(tmp, target)
                self._shards[i] = target
        self._write_manifest()
        return self.spill_dir

    @classmethod
    def open(cls, directory) -> "ActivationStore":
        """A store written by `save` / spilling."""
        d = Path(directory)
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ActivationError(f"{d} holds no readable activation store manifest: {e}") from None
        if m.get("format") != _FORMAT:
            raise ActivationError(f"{d}/manifest.json is not a headscope activation store.")
        st = cls(d_in=m["d_in"], shard_tokens=m["shard_tokens"], spill_dir=d, info=m.get("info", {}))
        st._shards = [d / f"shard_{i:05d}.safetensors" for i in range(m["n_shards"])]
        missing = [p.name for p in st._shards if not p.exists()]
        if missing:
            raise ActivationError(f"activation store {d} is missing shards {missing[:3]}.")
        return st

    # ---- reading ------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def n_tokens(self) -> int:
        return len(self._shards) * self.shard_tokens

    def shard(self, i: int) -> torch.Tensor:
        """Shard i: [shard_tokens, d_in] float32 (read from disk when spilled)."""
        s = self._shards[i]
        if isinstance(s, torch.Tensor):
            return s
        try:
            x = load_file(str(s))["x"]
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ActivationError(f"activation shard {s} cannot be read: {e}") from None
        if x.shape != (self.shard_tokens, self.d_in):
            raise ActivationError(f"activation shard {s} has shape {list(x.shape)}, expected "
                                  f"[{self.shard_tokens}, {self.d_in}].")
        return x

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n rows drawn from the first shards (for initialisation and quick statistics)."""
        rows, i = [], 0
        while sum(r.shape[0] for r in rows) < n and i < self.n_shards:
            rows.append(self.shard(i))
            i += 1
        if not rows:
            raise ActivationError("the activation store is empty.")
        x = torch.cat(rows)
        g = torch.Generator().manual_seed(seed)
        return x[torch.randperm(len(x), generator=g)[:n]]

    def batches(self, batch_size: int, *, seed: int = 0, start: int = 0, mix_shards: int = 4) -> Iterator[torch.Tensor]:
        """Endless shuffled batches [batch_size, d_in], starting at batch index `start` (resume)."""
        if self.n_shards == 0:
            raise ActivationError("the activation store is empty: collect activations first.")
        mix = max(1, min(mix_shards, self.n_shards))
        if mix * self.shard_tokens < batch_size:
            # every shard group would yield no batch: the loop below would spin forever
            raise ActivationError(f"a batch of {batch_size} rows needs more activations than the store mixes at once "
                                  f"({mix} shard(s) x {self.shard_tokens} tokens); collect more tokens or use a "
                                  "smaller batch size.")
        b, epoch = 0, 0
        while True:
            order = torch.randperm(self.n_shards, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for g0 in range(0, self.n_shards, mix):
                group = order[g0:g0 + mix].tolist()
                n = len(group) * self.shard_tokens // batch_size
                if b + n <= start:  # the whole group lies before the resume point: skip unread
                    b += n
                    continue
                x = torch.cat([self.shard(i) for i in group])
                gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 65_537 + g0)
                perm = torch.randperm(len(x), generator=gen)
                for j in range(n):
                    if b >= start:
                        yield x[perm[j * batch_size:(j + 1) * batch_size]]
                    b += 1
            epoch += 1


def collect(model, layer: int, site: str, token_batches: Iterable[torch.Tensor], n_tokens: int, *,
            store: ActivationStore | None = None, progress: bool = True) -> ActivationStore:
    """Stream activations of (layer, site) over token batches [B, S] into a store until it holds
    n_tokens (rounded down to whole shards; at least one shard). Position 0 of every sequence (BOS)
    is left out, so each [B, S] batch adds B * (S - 1) rows [n, d_in] float32 (see `site_dim`)."""
    model.meta.check_layer(layer)
    d_in = site_dim(model.meta, site)
    store = store or ActivationStore(d_in=d_in, shard_tokens=min(65536, max(1, n_tokens)))
    if store.d_in != d_in:
        raise ActivationError(f"store holds d_in={store.d_in}, site {site} of layer {layer} has {d_in}.")
    store.info.update({"model": model.meta.name, "layer": layer, "site": site, "hook_name": hook_name(layer, site)})
    target = max(store.shard_tokens, n_tokens // store.shard_tokens * store.shard_tokens)
    bar = tqdm(total=target, desc=f"activations L{layer} {site}", unit="tok", disable=not progress)
    got = 0
    for x in stream_activations(model, layer, site, token_batches):
        store.add(x)
        got += x.shape[0]
        bar.update(min(x.shape[0], max(0, target - bar.n)))
        if store.n_tokens >= target:
            break
    bar.close()
    if store.n_tokens < target:
        raise ActivationError(f"the corpus ran out after {got} tokens; {target} were asked for.")
    return store.finish()

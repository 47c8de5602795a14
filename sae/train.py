"""SAE training: AdamW, linear warm-up then linear decay of the learning rate, linear warm-up of
the sparsity coefficient (relu / jumprelu), unit-norm decoder upkeep, checkpoints every N steps
and exact resume.

Exact resume: batch b is a pure function of (seed, b) (see `ActivationStore.batches`), the
learning-rate and sparsity schedules are functions of the step, and a checkpoint holds the SAE
(with its dead-latent counters), the AdamW state, the scheduler state and the torch RNG state. A
run resumed from a checkpoint therefore performs the same floating-point operations in the same
order as an uninterrupted run and ends with identical weights (same machine, same thread count).

Checkpoint layout (out_dir/checkpoints/step_{n:08d}/): sae.safetensors, optimizer.pt
(tensors and numbers only; loaded with weights_only=True), state.json; out_dir/checkpoints/LATEST
names the newest complete one (written last, atomically).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from headscope.kernels.errors import HeadscopeError

from .activations import ActivationStore
from .architectures import SAE, SAEConfig
from .init import init_b_dec


class CheckpointError(HeadscopeError, ValueError):
    """A checkpoint that is missing, corrupted, or from another model / configuration."""


CALIBRATION_BATCHES = 32  # batches that set a BatchTopK SAE's inference threshold after training


@dataclass
class TrainConfig:
    """Training settings. steps = total_tokens // batch_size; the learning rate warms up linearly
    over warmup_frac of the steps and decays linearly to 0 over the last decay_frac; seed fixes the
    initialisation and the batch order; b_dec_init: "geometric_median", "mean" or "zeros" on
    init_sample rows of the store; grad_clip: max gradient norm (0 = off)."""

    total_tokens: int = 1_000_000
    batch_size: int = 1024
    lr: float = 4e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_frac: float = 0.02
    decay_frac: float = 0.2            # lr decays linearly to 0 over the last decay_frac of steps
    sparsity_coeff: float = 0.0        # l1 (relu) / l0 (jumprelu) coefficient after warm-up
    sparsity_warmup_frac: float = 0.05
    checkpoint_every: int = 0          # steps; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    b_dec_init: str = "geometric_median"
    init_sample: int = 16384
    mix_shards: int = 4
    grad_clip: float = 1.0

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def lr_factor(self, step: int) -> float:
        n = self.steps
        warm = max(1, int(self.warmup_frac * n))
        if step < warm:
            return (step + 1) / warm
        decay = int(self.decay_frac * n)
        if decay and step >= n - decay:
            return max(0.0, (n - step) / decay)
        return 1.0

    def sparsity_at(self, step: int) -> float:
        warm = int(self.sparsity_warmup_frac * self.steps)
        return self.sparsity_coeff * (min(1.0, (step + 1) / warm) if warm else 1.0)


@dataclass
class TrainResult:
    sae: SAE
    steps: int
    history: list  # dicts: step, loss, mse, l0, fvu (batch estimate), lr

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def new_sae(cfg: SAEConfig, store: ActivationStore, train_cfg: TrainConfig) -> SAE:
    """A freshly initialised SAE (seeded) with b_dec from a sample of the store."""
    g = torch.Generator().manual_seed(train_cfg.seed)
    sae = SAE(cfg)
    sae.reset_parameters(generator=g)
    init_b_dec(sae, store.sample(train_cfg.init_sample, seed=train_cfg.seed), train_cfg.b_dec_init)
    return sae


def _optimizer(sae: SAE, tc: TrainConfig):
    opt = torch.optim.AdamW(sae.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: tc.lr_factor(s))
    return opt, sched


def train(sae: SAE, store: ActivationStore, tc: TrainConfig, *, out_dir=None, resume: bool = False,
          callback: Callable[[int, SAE, dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `sae` on batches from `store`. With out_dir, checkpoints go to out_dir/checkpoints;
    resume=True continues from the newest one (refused if it belongs to another model/config).
    callback(step, sae, parts) runs after each optimiser step (a raise there stops training)."""
    if store.d_in != sae.cfg.d_in:
        raise CheckpointError(f"activations have d_in={store.d_in}, the SAE expects {sae.cfg.d_in}.")
    opt, sched = _optimizer(sae, tc)
    start, history = 0, []
    ckdir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    if resume:
        if ckdir is None:
            raise CheckpointError("resume needs out_dir (where the checkpoints are).")
        start, history = load_checkpoint(ckdir, sae, opt, sched, tc)
    sae.train()
    batches = store.batches(tc.batch_size, seed=tc.seed, start=start, mix_shards=tc.mix_shards)
    bar = tqdm(total=tc.steps, initial=start, desc=f"SAE {sae.cfg.arch}", unit="step", disable=not progress)
    dev = sae.W_enc.device  # the store serves CPU batches; a CUDA SAE trains on the GPU
    for step in range(start, tc.steps):
        x = next(batches).to(dev)
        parts = sae.loss(x, tc.sparsity_at(step))
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        sae.remove_parallel_grad()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        sae.normalize_decoder()
        with torch.no_grad():
            var = (x - x.mean(0)).pow(2).sum(-1).mean()
            rec = {"step": step + 1, "loss": float(parts["loss"]), "mse": float(parts["mse"]),
                   "l0": float(parts["l0"]), "fvu": float(parts["mse"] / var), "lr": sched.get_last_lr()[0]}
        history.append(rec)
        bar.update(1)
        if step % 10 == 0 or step + 1 == tc.steps:
            bar.set_postfix(loss=f"{rec['loss']:.4g}", l0=f"{rec['l0']:.1f}", fvu=f"{rec['fvu']:.3f}")
        if ckdir is not None and tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps:
            save_checkpoint(ckdir, sae, opt, sched, tc, step + 1, history)
        if callback is not None:
            callback(step + 1, sae, parts)
    bar.close()
    sae.eval()
    if sae.cfg.arch == "batchtopk":
        # the inference threshold from the final weights, on batches of another shuffle
        calib = store.batches(tc.batch_size, seed=tc.seed + 1, mix_shards=tc.mix_shards)
        sae.calibrate_threshold(next(calib) for _ in range(min(CALIBRATION_BATCHES, tc.steps)))
    if ckdir is not None:
        save_checkpoint(ckdir, sae, opt, sched, tc, tc.steps, history)
    return TrainResult(sae=sae, steps=tc.steps, history=history)


# ---- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(ckdir: Path, sae: SAE, opt, sched, tc: TrainConfig, step: int, history: list) -> Path:
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:08d}"
    tmp = ckdir / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(tmp / "sae.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "sae_cfg": sae.cfg.to_dict(),
                                                "train_cfg": asdict(tc), "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckdir / "LATEST.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckdir / "LATEST")
    old = sorted(p for p in ckdir.glob("step_*") if p.name != final.name)
    for p in old[: max(0, len(old) - (tc.keep_checkpoints - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


_SAE_RUN_KEYS = ("model", "layer", "site", "d_in", "d_sae", "arch", "k", "k_aux", "aux_coeff", "dead_tokens",
                 "jumprelu_init_threshold", "jumprelu_bandwidth")


def _same_run(a: dict, b: dict, keys) -> list[str]:
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def load_checkpoint(ckdir: Path, sae: SAE, opt, sched, tc: TrainConfig) -> tuple[int, list]:
    """Restore SAE, optimizer, scheduler and RNG from the newest checkpoint -> (step, history)."""
    ckdir = Path(ckdir)
    try:
        name = (ckdir / "LATEST").read_text().strip()
    except OSError:
        raise CheckpointError(f"no checkpoint to resume from in {ckdir}.") from None
    d = ckdir / name
    try:
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "sae.safetensors"))
        blob = torch.load(d / "optimizer.pt", weights_only=True)
    except Exception as e:  # json, safetensors and torch each raise their own types on a damaged file
        raise CheckpointError(f"checkpoint {d} is corrupted or incomplete: {type(e).__name__}: {e}") from None
    # every setting that shapes the trajectory must match for an exact resume (not the bookkeeping)
    diffs = _same_run(state["sae_cfg"], sae.cfg.to_dict(), _SAE_RUN_KEYS)
    now = json.loads(json.dumps(asdict(tc)))  # as the checkpoint stored it (tuples become lists)
    diffs += _same_run(state["train_cfg"], now, [k for k in now if k not in ("checkpoint_every", "keep_checkpoints")])
    if diffs:
        raise CheckpointError(f"checkpoint {d} belongs to another run: " + "; ".join(diffs))
    try:
        sae.load_state_dict(weights)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d} does not fit this SAE: {e}") from None
    return int(state["step"]), list(state["history"])

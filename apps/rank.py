"""`headscope rank`: run head detectors on a model and write the report directory.

    headscope rank                                   # every detector, embedded model -> ./headscope-report/
    headscope rank --detectors sink,induction --seq-len 256 --out runs/a
    torchrun --nproc_per_node=2 -m headscope.apps.cli rank ...   # prompts sharded over processes

Writes report.html, heads.csv, heads.json (identical bytes for the same seed) and run.json (timing).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from headscope.circuits import sharding
from headscope.circuits.detectors import get_detector
from headscope.circuits.scores import KINDS, DetectorResult
from headscope.probe import load_model
from headscope.probe.errors import InputError

from .rank_options import DTYPES, RankOptions, resolve
from .rank_output import top_heads_text, write_heads, write_run_info
from .report import render_report
from .staging import StagedDir
from .thumbnails import record_thumbnails


def add_rank_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rank", help="rank every attention head by kind and write an HTML/CSV/JSON report",
        description="Run head detectors (" + ", ".join(KINDS) + ") with causal validation and write "
                    "report.html, heads.csv, heads.json and run.json into --out. Flags override --config values.")
    # Every default is None so that a --config file value is only overridden by a flag actually given.
    p.add_argument("--model", default=None, help="local model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--detectors", default=None, help="comma-separated kinds to run (default: all)")
    p.add_argument("--seq-len", type=int, default=None, help="prompt length in tokens (default: each detector's)")
    p.add_argument("--n-prompts", type=int, default=None, help="prompts per detector (default: each detector's)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--device-map", default=None, choices=["auto"], help="'auto' spreads a large model over GPUs")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="parameter dtype (default float32)")
    p.add_argument("--seed", type=int, default=None, help="seed for prompts and random head sets (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="heads ablated in the causal check and listed (default 8)")
    p.add_argument("--n-random", type=int, default=None, help="random head sets in the causal check (default 5)")
    p.add_argument("--no-validate", dest="validate", action="store_const", const=False, default=None,
                   help="skip the causal check (ablation of top-k vs random heads)")
    p.add_argument("--ablate-each", dest="ablate_each", action="store_const", const=True, default=None,
                   help="the causal check also ablates each top head alone: an ablation_delta column "
                        "(top_k more runs of each behaviour metric)")
    p.add_argument("--prompts", default=None,
                   help="your own prompts: a .txt (one per line) or .jsonl file, or a saved HF dataset folder")
    p.add_argument("--config", default=None, help="TOML file with these options and [detectors.<kind>] tables")
    p.add_argument("--out", default=None, help="report directory (default ./headscope-report)")
    p.add_argument("--quiet", action="store_const", const=True, default=None, help="no progress bars")
    p.set_defaults(func=run_rank_command)
    return p


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_validation_sizes(opts: RankOptions, n_heads: int) -> None:
    """Validation draws random top_k-head sets from the heads outside the top set: refuse a top_k that
    leaves too few, now, not after the detectors have run."""
    for kind in opts.kinds:
        cfg = opts.detector_config(kind)
        if cfg.validate and cfg.top_k > n_heads - cfg.top_k:
            raise InputError(f"--top-k {cfg.top_k} is too large for validating {kind} on a model with {n_heads} "
                             f"heads: the random sets need {cfg.top_k} heads outside the top {cfg.top_k} "
                             f"(at most {n_heads // 2}), or pass --no-validate.")


def _check_seq_len(opts: RankOptions, meta) -> None:
    """Refuse a seq_len longer than the model's context now, not inside the first detector that
    reaches a forward pass (after the kinds before it have run)."""
    if not meta.max_positions:
        return
    for kind in opts.kinds:
        seq_len = opts.detector_config(kind).seq_len
        if seq_len is not None and seq_len > meta.max_positions:
            where = "--seq-len" if "seq_len" in opts.from_flags else f"seq_len (config, {kind})"
            raise InputError(f"{where} {seq_len} is longer than {meta.name}'s context of {meta.max_positions} "
                             f"tokens: pass --seq-len {meta.max_positions} or less.")


def run_rank(opts: RankOptions) -> dict[str, DetectorResult] | None:
    """Run the detectors and (in the main process) write the report. Returns the results."""
    main = sharding.is_main()
    stage = StagedDir(opts.out) if main else None  # fails before any model work when --out is unwritable
    try:
        t0 = time.perf_counter()
        # The main process loads first: on a first run it converts and caches the embedded model,
        # which the others then read instead of converting it concurrently.
        if not main:
            sharding.barrier()
        model = load_model(opts.model, device=opts.device, dtype=opts.torch_dtype, device_map=opts.device_map)
        if main:
            sharding.barrier()
        timing = {"load_model_s": time.perf_counter() - t0}
        _check_validation_sizes(opts, model.meta.n_total_heads)
        _check_seq_len(opts, model.meta)
        cpu: dict[str, float] = {}
        results: dict[str, DetectorResult] = {}
        bar = tqdm(opts.kinds, desc="detectors", unit="kind", disable=opts.quiet or not main, file=sys.stderr)
        for kind in bar:
            bar.set_postfix_str(kind)
            _seed_everything(opts.seed)
            t, c = time.perf_counter(), time.process_time()
            results[kind] = get_detector(kind)(model, opts.detector_config(kind))
            timing[f"{kind}_s"] = time.perf_counter() - t
            # CPU seconds too: on a shared machine wall time says more about the neighbours than about us.
            cpu[kind] = time.process_time() - c
        if not main:
            return results
        t = time.perf_counter()
        thumbs = record_thumbnails(model, results)
        timing["thumbnails_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t0
        info = {"command": " ".join(["headscope"] + sys.argv[1:]), "model": model.meta.name, "device": opts.device,
                "dtype": opts.dtype, "seed": opts.seed, "processes": sharding.world_size(),
                "detector_configs": {k: vars(opts.detector_config(k)) for k in opts.kinds},
                "timing": timing, "cpu_s": {**cpu, "process_total": time.process_time()},
                "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
        write_heads(stage.path, model.meta, results)
        write_run_info(stage.path, info)
        html = render_report(model.meta, results, top_k=opts.top_k, thumbs=thumbs,
                             run_info={"processes": info["processes"], "seed": opts.seed, "device": opts.device,
                                       **{k: round(v, 2) for k, v in timing.items()}})
        (stage.path / "report.html").write_text(html, encoding="utf-8")
        stage_replaced = stage.replaces
        out = stage.commit()
        stage = None
        print(top_heads_text(results, min(opts.top_k, 5)))
        note = "; it replaced the earlier report there" if stage_replaced else ""
        print(f"report: {out / 'report.html'}  (heads.csv, heads.json, run.json beside it; "
              f"{timing['total_s']:.0f} s{note})")
        return results
    finally:
        if stage is not None:
            stage.discard()


def run_rank_command(args) -> int:
    opts = resolve(args)
    opts.device = sharding.init_distributed(opts.device)
    try:
        run_rank(opts)
    finally:
        sharding.shutdown_distributed()
    return 0

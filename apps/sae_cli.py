"""`headscope sae train` and `headscope sae eval`.

apps/cli.py calls `add_sae_parser(subparsers)`; until then: `python -m headscope.apps.sae_cli ...`.
Output directory of `train` (--out DIR): the final SAE in SAELens format (cfg.json,
sae_weights.safetensors, sparsity.safetensors), checkpoints/ (resumable with --resume) and
train.json (config, history summary). `eval DIR` writes DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headscope.kernels.errors import HeadscopeError


def add_sae_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sae` (with `train` and `eval`) on an argparse subparsers object."""
    p = subparsers.add_parser("sae", help="train and evaluate sparse autoencoders on head outputs")
    sub = p.add_subparsers(dest="sae_command", required=True)

    t = sub.add_parser("train", help="train an SAE on one layer's head outputs z (or residual stream)")
    t.add_argument("--model", default=None, help="hub id or local dir (default: the embedded SmolLM2-135M)")
    t.add_argument("--layer", type=int, required=True)
    t.add_argument("--site", choices=["z", "resid"], default="z")
    t.add_argument("--arch", choices=["topk", "batchtopk", "relu", "jumprelu"], default="topk")
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--expansion", type=int, default=16)
    t.add_argument("--tokens", type=int, default=1_000_000,
                   help="activations to collect (whole shards of up to 65,536 tokens; training repeats them)")
    t.add_argument("--out", required=True)
    t.add_argument("--corpus", default=None, help=".txt / .jsonl / saved HF dataset dir (default: embedded); "
                   "about 1 document in 20 is held out of training for `sae eval`")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--sparsity-coeff", type=float, default=None,
                   help="l1 (relu) / l0 (jumprelu) coefficient; required for those two (topk / batchtopk "
                        "fix their sparsity with --k)")
    t.add_argument("--dead-tokens", type=int, default=10_000_000)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--model-batch", type=int, default=16)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--acts-dir", default=None, help="cache activations here (reused when it exists)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="where the model runs to collect activations; the SAE "
                   "itself trains on the CPU")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="L0, FVU, dead/dense latents, CE loss recovered, top contexts")
    e.add_argument("dir")
    e.add_argument("--model", default=None)
    e.add_argument("--corpus", default=None, help="default: the embedded corpus, drawn with another seed than training's")
    e.add_argument("--split", choices=("held_out", "all"), default="held_out",
                   help="of a --corpus: its held-out documents (the ones `sae train` skipped), or all of it "
                        "(a separate evaluation file)")
    e.add_argument("--batches", type=int, default=4)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--model-batch", type=int, default=8)
    e.add_argument("--top-latents", type=int, default=8, help="latents to list top contexts for")
    e.add_argument("--device", default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    return p


def _load(args):
    from headscope.probe import load_model

    kw = {"device": args.device} if args.device else {}
    return load_model(args.model, **kw) if args.model else load_model(**kw)


def cmd_train(args) -> int:
    from headscope.sae.activations import ActivationStore, collect, site_dim
    from headscope.sae.architectures import SAEConfig
    from headscope.sae.corpus import corpus_texts, packed_batches
    from headscope.sae.metrics import reconstruction_metrics
    from headscope.sae.saelens_format import save_sae
    from headscope.sae.train import TrainConfig, new_sae, train

    if args.arch in ("relu", "jumprelu") and not args.sparsity_coeff:
        raise CLIError(f"--arch {args.arch} needs --sparsity-coeff > 0 (its l1 / l0 penalty); without one "
                       "the SAE is trained dense.")
    if args.arch in ("topk", "batchtopk") and args.sparsity_coeff:
        raise CLIError(f"--sparsity-coeff does not apply to --arch {args.arch} (its sparsity is --k).")
    args.sparsity_coeff = args.sparsity_coeff or 0.0
    if args.tokens < args.batch_size:
        raise CLIError(f"--tokens {args.tokens} is fewer than one batch (--batch-size {args.batch_size}).")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; give a folder for the SAE and its checkpoints.")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise CLIError(f"{out} is not empty; pick a new --out or pass --resume (nothing was overwritten).")
    # read now: an empty / non-text corpus fails before the model loads
    texts = corpus_texts(args.corpus, seed=args.seed, split="all" if args.corpus is None else "train")
    model = _load(args)
    model.meta.check_layer(args.layer)
    d_in = site_dim(model.meta, args.site)
    m = model.meta
    cfg = SAEConfig(d_in=d_in, d_sae=d_in * args.expansion, arch=args.arch, k=args.k, dead_tokens=args.dead_tokens,
                    model=m.name, layer=args.layer, site=args.site, n_heads=m.n_heads, head_dim=m.head_dim)
    tc = TrainConfig(total_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     sparsity_coeff=args.sparsity_coeff, checkpoint_every=args.checkpoint_every)
    acts = Path(args.acts_dir) if args.acts_dir else None
    # what the activations are: a cache made with other data must not stand in for the one asked for
    source = {"model": m.name, "layer": args.layer, "site": args.site, "corpus": args.corpus,
              "seq_len": args.seq_len, "tokens": args.tokens, "seed": args.seed}
    if args.corpus is not None:
        source["corpus_split"] = "train"  # a cache from before the split also read the held-out documents
    if acts is not None and (acts / "manifest.json").exists():
        store = ActivationStore.open(acts)
        cached = {k: store.info.get("source", {}).get(k) for k in source}  # none recorded: refused
        if cached != source:
            diff = {k: (cached[k], source[k]) for k in source if cached[k] != source[k]}
            raise CLIError(f"cached activations in {acts} were collected with other settings "
                           f"(cached, asked): {diff}; use another --acts-dir or delete this one.")
    else:
        bos = model.tokenizer.bos_token_id
        rows = packed_batches(model.tokenizer, texts, seq_len=args.seq_len, batch_size=args.model_batch, bos_id=bos)
        store = ActivationStore(d_in=d_in, shard_tokens=min(65536, args.tokens), spill_dir=acts)
        store = collect(model, args.layer, args.site, rows, args.tokens, store=store, progress=not args.quiet)
        store.info["source"] = source
        if acts is not None:
            store.save(acts)
    out.mkdir(parents=True, exist_ok=True)
    res = train(new_sae(cfg, store, tc), store, tc, out_dir=out, resume=args.resume, progress=not args.quiet)
    stats = reconstruction_metrics(res.sae, (store.shard(i) for i in range(min(2, store.n_shards))))
    save_sae(res.sae, out, log_sparsity=stats["density"].clamp_min(1e-10).log10(), context_size=args.seq_len)
    summary = {"sae": cfg.to_dict(), "train": {k: v for k, v in vars(args).items() if k != "func"},
               "tokens": store.n_tokens, "steps": res.steps, "last_batch": res.final,
               "train_sample": {k: v for k, v in stats.items() if k != "density"}}
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["train_sample"], indent=1))
    return 0


def cmd_eval(args) -> int:
    import torch

    from headscope.sae.activations import site_dim, stream_activations
    from headscope.sae.corpus import corpus_texts, packed_batches
    from headscope.sae.metrics import ce_loss_recovered, head_attribution, reconstruction_metrics, top_activating
    from headscope.sae.saelens_format import load_sae

    d = Path(args.dir)
    split = "all" if args.corpus is None else args.split
    texts = corpus_texts(args.corpus, seed=12345, split=split)  # read now: bad input fails before the model loads
    sae = load_sae(d)
    model = _load(args)
    c = sae.cfg
    if c.model and c.model != model.meta.name:
        raise CLIError(f"{d} was trained on {c.model!r}, not {model.meta.name!r}; pass the right --model.")
    model.meta.check_layer(c.layer)
    sae = sae.to(model.device)  # the splice and the metrics meet the model's activations there
    if site_dim(model.meta, c.site) != c.d_in:
        raise CLIError(f"{d} reads {c.site} vectors of {c.d_in} dimensions; {model.meta.name} layer {c.layer} has "
                       f"{site_dim(model.meta, c.site)}: load the model it was trained on.")
    rows = packed_batches(model.tokenizer, texts, seq_len=args.seq_len, batch_size=args.model_batch,
                          bos_id=model.tokenizer.bos_token_id)
    batches = [b for _, b in zip(range(args.batches), rows)]
    rec = reconstruction_metrics(sae, stream_activations(model, c.layer, c.site, batches))
    res = {"corpus": args.corpus or "embedded (seed 12345)", "split": split}
    res |= {k: v for k, v in rec.items() if k != "density"}
    res |= ce_loss_recovered(model, sae, c.layer, batches)
    if c.site == "z":
        attr = head_attribution(sae, model.meta.n_heads, model.meta.head_dim)
        lat = torch.argsort(rec["density"], descending=True)[: args.top_latents].tolist()
        res["top_contexts"] = top_activating(model, sae, c.layer, batches, lat, n=3)
        res["head_attribution_of_listed"] = {i: attr[i].tolist() for i in lat}
    (d / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}, indent=1))
    return 0


class CLIError(HeadscopeError, ValueError):
    """A command-line request that cannot be carried out."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="headscope")
    add_sae_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except HeadscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["sae"] else ["sae", *sys.argv[1:]]))

"""SAE training throughput and FVU: headscope vs SAELens' trainer, side by side in one run, on the
same cached activations (an `ActivationStore` on disk) and the same config (TopK, k, d_sae, batch,
lr, steps, AuxK, same threads, same device).

CPU, on the store sae_acceptance.py collects from the embedded model:

    python benchmarks/sae_bench.py --acts /tmp/sae_acceptance/acts [--steps 64] [--threads 1]

GPU machine (weights cannot travel there): with --collect-random N and no store at --acts, a
random-weight LlamaForCausalLM with the embedded SmolLM2-135M's shapes (built as in
e2e_long_context.py) is run over random token ids and N tokens of layer --layer's z go through our
recorder (`headscope.sae.activations.collect`) into a store at --acts first; the SAELens side runs
on a plain python with the carried wheels on --child-pythonpath:

    python benchmarks/sae_bench.py --device cuda --acts /tmp/acts --collect-random 1048576 \\
        --steps 64,960 --child-python python3 --child-pythonpath /tmp/saelens-site

The GPU machine has no network: the SAELens side's packages travel as py3.12 wheels
(`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
--platform manylinux_2_28_x86_64 -d .whl-saelens` sae-lens==6.54.12 transformer-lens==3.9.0
datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 better-abc==0.0.3 simple-parsing==0.1.9
docstring-parser==0.18.0 wandb==0.31.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
typing-inspection==0.4.5 typing-extensions==4.16.0 platformdirs==4.14.7 protobuf==7.36.2
googleapis-common-protos==1.76.0 opentelemetry-{api,sdk,proto,exporter-otlp-proto-http,
exporter-otlp-proto-common}==1.45.2 opentelemetry-{semantic-conventions,exporter-http-transport,
exporter-otlp-common}==0.66b2), installed there with `pip install --no-deps --target
/tmp/saelens-site`; the machine's own transformers 5.17 / huggingface-hub 1.33 serve both sides.

Activations are cached: neither trainer runs the language model. Training shards = all but the
last; FVU is measured by each side's own trained SAE on the last shard (held out) with the same
formula. Each side trains once for 2 steps first (start-up costs: optimizer, cuBLAS handles) and
is timed with the device synchronized before and after. SAELens runs as a subprocess (its own venv,
made by benchmarks/saelens_interop.py, or --child-python/--child-pythonpath) that reads the same
safetensors shards; its batches are drawn from those rows on the CPU and moved to the device per
step, as ours are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from headscope.sae.activations import ActivationStore, collect, site_dim
from headscope.sae.architectures import SAEConfig
from headscope.sae.metrics import reconstruction_metrics
from headscope.sae.train import TrainConfig, new_sae, train

_CHILD = r'''
import json, sys, time, torch
from importlib.metadata import version
from safetensors.torch import load_file
from sae_lens.config import SAETrainerConfig, LoggingConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
dev = a["device"]
def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
train_x = load_file(a["train"])["x"]
test_x = load_file(a["test"])["x"].to(dev)
B = a["batch"]
def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(len(train_x) // B):
            yield train_x[perm[i * B:(i + 1) * B]]
def run(steps):
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train_x.shape[1], d_sae=a["d_sae"], k=a["k"],
                                                aux_loss_coefficient=1 / 32, device=dev))
    cfg = SAETrainerConfig(total_training_samples=B * steps, train_batch_size_samples=B, lr=a["lr"], lr_end=0.0,
                           lr_warm_up_steps=max(1, steps // 50), lr_decay_steps=steps // 5, device=dev,
                           dead_feature_window=a["dead_window"], feature_sampling_window=10**9,
                           logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1)
    trainer = SAETrainer(cfg, sae, batches())
    sync()
    t = time.perf_counter()
    trainer.fit()
    sync()
    return sae, time.perf_counter() - t
run(2)  # start-up costs outside the timed runs, as on our side
out = {"versions": {p: version(p) for p in ("sae-lens", "transformer-lens", "transformers", "torch")}, "runs": []}
for steps in a["steps"]:
    sae, dt = run(steps)
    sae.eval()
    with torch.no_grad():
        xh = sae.decode(sae.encode(test_x)).double()
    x = test_x.double()
    fvu = float((xh - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    out["runs"].append({"steps": steps, "seconds": dt, "fvu": fvu})
    del sae
print(json.dumps(out))
'''


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def collect_random(acts: Path, n_tokens: int, layer: int, shard_tokens: int, seq: int, rows: int, device: str) -> dict:
    """Layer `layer`'s z of a random-weight SmolLM2-135M-shaped model over random token ids, through
    our recorder, into a store at `acts`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e_long_context import build  # the same model construction as the long-context benchmark

    import headscope.probe as probe

    hs = probe.load_model(build(30, seq, torch.device(device), torch.float32))

    def token_batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, 49152, (rows, seq), generator=g)

    store = ActivationStore(d_in=site_dim(hs.meta, "z"), shard_tokens=shard_tokens,
                            max_memory_tokens=n_tokens + shard_tokens, spill_dir=acts)
    sync(device)
    t = time.perf_counter()
    collect(hs, layer, "z", token_batches(), n_tokens, store=store, progress=False)
    sync(device)
    dt = time.perf_counter() - t
    store.info["weights"] = "random (LlamaConfig of SmolLM2-135M, torch.manual_seed(0)), random token ids"
    store.save(acts)
    del hs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": dt, "tokens": store.n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", default="/tmp/sae_acceptance/acts")
    ap.add_argument("--venv", default="/tmp/saelens-venv")
    ap.add_argument("--child-python", default=None, help="python for the SAELens side (default: the venv's)")
    ap.add_argument("--child-pythonpath", default=None, help="PYTHONPATH for the SAELens side (carried wheels)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", default="64", help="comma-separated: one timed run per value")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--collect-random", type=int, default=0, metavar="N",
                    help="if --acts holds no store: collect N tokens from a random-weight model first")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=16, help="sequences per forward when collecting")
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    steps_list = [int(s) for s in a.steps.split(",")]
    acts = Path(a.acts)
    collected = None
    if a.collect_random and not (acts / "manifest.json").exists():
        collected = collect_random(acts, a.collect_random, a.layer, a.shard_tokens, a.seq, a.rows, a.device)
    store = ActivationStore.open(acts)
    if store.n_shards < 2:
        sys.exit("need at least 2 shards (train + held-out).")
    train_x = torch.cat([store.shard(i) for i in range(store.n_shards - 1)])
    test_x = store.shard(store.n_shards - 1)
    d_in, d_sae = store.d_in, store.d_in * a.expansion
    work = Path(tempfile.mkdtemp(prefix="sae-bench-"))
    save_file({"x": train_x.contiguous()}, str(work / "train.safetensors"))
    save_file({"x": test_x.contiguous()}, str(work / "test.safetensors"))

    tr = ActivationStore(d_in=d_in, shard_tokens=store.shard_tokens, max_memory_tokens=len(train_x))
    for i in range(store.n_shards - 1):
        tr.add(store.shard(i))
    tr.finish()
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch="topk", k=a.k, dead_tokens=a.batch * 100)
    # one-time start-up costs (optimizer / autograd imports, cuBLAS handles) fall before SAELens' timer too
    warm = TrainConfig(total_tokens=2 * a.batch, batch_size=a.batch, lr=a.lr)
    train(new_sae(cfg, tr, warm).to(a.device), tr, warm, progress=False)
    ours = []
    for steps in steps_list:
        tc = TrainConfig(total_tokens=steps * a.batch, batch_size=a.batch, lr=a.lr)
        sae = new_sae(cfg, tr, tc).to(a.device)
        sync(a.device)
        t = time.perf_counter()
        train(sae, tr, tc, progress=False)
        sync(a.device)
        ours.append({"steps": steps, "seconds": time.perf_counter() - t,
                     "fvu": reconstruction_metrics(sae, [test_x])["fvu"]})
        print(f"headscope {steps} steps: {steps * a.batch / ours[-1]['seconds']:.0f} tok/s, "
              f"held-out FVU {ours[-1]['fvu']:.3f}", flush=True)
        del sae

    child = {"train": str(work / "train.safetensors"), "test": str(work / "test.safetensors"), "batch": a.batch,
             "steps": steps_list, "d_sae": d_sae, "k": a.k, "lr": a.lr, "threads": a.threads, "dead_window": 100,
             "device": a.device}
    py = a.child_python or str(Path(a.venv) / "bin" / "python")
    env = dict(os.environ)
    if a.child_pythonpath is not None:
        env["PYTHONPATH"] = a.child_pythonpath
    out = subprocess.run([py, "-c", _CHILD, json.dumps(child)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        if a.json:
            Path(a.json).write_text(json.dumps({"headscope_only": ours, "collected_this_run": collected}, indent=1))
        sys.exit(f"SAELens side failed:\n{out.stderr[-3000:]}")
    theirs = json.loads(out.stdout.strip().splitlines()[-1])

    import transformers
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({a.threads} thread(s))"
    res = {"device": dev_name, "acts": str(acts), "store_info": store.info, "d_in": d_in, "d_sae": d_sae, "k": a.k,
           "batch": a.batch, "lr": a.lr, "threads": a.threads, "held_out_tokens": len(test_x),
           "train_tokens_available": len(train_x), "collected_this_run": collected,
           "versions": {"headscope": {"torch": torch.__version__, "transformers": transformers.__version__},
                        "saelens_side": theirs["versions"]},
           "runs": [{"steps": o["steps"], "tokens": o["steps"] * a.batch, "headscope_s": o["seconds"],
                     "headscope_fvu": o["fvu"], "saelens_s": t["seconds"], "saelens_fvu": t["fvu"]}
                    for o, t in zip(ours, theirs["runs"])]}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    how = (f"collected in this run ({collected['tokens']} tokens in {collected['seconds']:.1f} s), then read from disk"
           if collected else "read from disk (collected earlier)")
    print(f"cached activations: {acts} ({store.info.get('model')} {store.info.get('hook_name')}"
          f"{', weights ' + store.info['weights'] if 'weights' in store.info else ''}); {how}")
    print(f"d_in {d_in}, d_sae {d_sae}, k {a.k}, batch {a.batch}, lr {a.lr}, AuxK 1/32 (dead after 100 batches), "
          f"{a.threads} CPU thread(s), device {dev_name}, held-out {len(test_x)} tokens")
    print(f"versions: ours torch {torch.__version__}, transformers {transformers.__version__}; SAELens side "
          + ", ".join(f"{k} {v}" for k, v in theirs["versions"].items()))
    print(f"{'steps':>6}{'tokens':>9} | {'headscope tok/s':>16}{'FVU':>7} | {'SAELens tok/s':>14}{'FVU':>7} | ratio")
    for r in res["runs"]:
        print(f"{r['steps']:>6}{r['tokens']:>9} | {r['tokens'] / r['headscope_s']:>16.0f}{r['headscope_fvu']:>7.3f} | "
              f"{r['tokens'] / r['saelens_s']:>14.0f}{r['saelens_fvu']:>7.3f} | {r['saelens_s'] / r['headscope_s']:.2f}x")


if __name__ == "__main__":
    main()

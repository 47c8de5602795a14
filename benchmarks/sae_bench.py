"""SAE training throughput and FVU: headscope vs SAELens' trainer, side by side in one run, on the
same cached activations (an `ActivationStore` on disk, e.g. the one sae_acceptance.py collects)
and the same config (TopK, k, d_sae, batch, lr, steps, AuxK, same threads).

    python benchmarks/sae_bench.py --acts /tmp/sae_acceptance/acts [--steps 64] [--threads 1]

Activations are cached: neither side runs the language model here. Training shards = all but
the last; FVU is measured by each side's own trained SAE on the last shard (held out) with the
same formula. SAELens runs in its own venv (benchmarks/saelens_interop.py makes it) as a
subprocess that reads the same safetensors shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from headscope.sae.activations import ActivationStore
from headscope.sae.architectures import SAEConfig
from headscope.sae.metrics import reconstruction_metrics
from headscope.sae.train import TrainConfig, new_sae, train

_CHILD = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens.config import SAETrainerConfig, LoggingConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
train_x = load_file(a["train"])["x"]
test_x = load_file(a["test"])["x"]
B, steps = a["batch"], a["steps"]
def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(len(train_x) // B):
            yield train_x[perm[i * B:(i + 1) * B]]
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train_x.shape[1], d_sae=a["d_sae"], k=a["k"],
                                            aux_loss_coefficient=1 / 32))
cfg = SAETrainerConfig(total_training_samples=B * steps, train_batch_size_samples=B, lr=a["lr"], lr_end=0.0,
                       lr_warm_up_steps=max(1, steps // 50), lr_decay_steps=steps // 5, device="cpu",
                       dead_feature_window=a["dead_window"], feature_sampling_window=10**9,
                       logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1)
trainer = SAETrainer(cfg, sae, batches())
t = time.time()
trainer.fit()
dt = time.time() - t
sae.eval()
with torch.no_grad():
    xh = sae.decode(sae.encode(test_x))
fvu = float((xh - test_x).pow(2).sum() / (test_x - test_x.mean(0)).pow(2).sum())
print(json.dumps({"seconds": dt, "fvu": fvu}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", default="/tmp/sae_acceptance/acts")
    ap.add_argument("--venv", default="/tmp/saelens-venv")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    store = ActivationStore.open(a.acts)
    if store.n_shards < 2:
        sys.exit("need at least 2 shards (train + held-out).")
    train_x = torch.cat([store.shard(i) for i in range(store.n_shards - 1)])
    test_x = store.shard(store.n_shards - 1)
    d_in, d_sae = store.d_in, store.d_in * a.expansion
    work = Path(tempfile.mkdtemp(prefix="sae-bench-"))
    save_file({"x": train_x.contiguous()}, str(work / "train.safetensors"))
    save_file({"x": test_x.contiguous()}, str(work / "test.safetensors"))
    tokens = a.steps * a.batch

    tr = ActivationStore(d_in=d_in, shard_tokens=store.shard_tokens)
    for i in range(store.n_shards - 1):
        tr.add(store.shard(i))
    tr.finish()
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch="topk", k=a.k, dead_tokens=a.batch * 100)
    tc = TrainConfig(total_tokens=tokens, batch_size=a.batch, lr=a.lr)
    # one-time torch start-up costs (optimizer / autograd imports) fall before SAELens' timer too
    warm = TrainConfig(total_tokens=2 * a.batch, batch_size=a.batch, lr=a.lr)
    train(new_sae(cfg, tr, warm), tr, warm, progress=False)
    sae = new_sae(cfg, tr, tc)
    t = time.time()
    train(sae, tr, tc, progress=False)
    ours_s = time.time() - t
    ours_fvu = reconstruction_metrics(sae, [test_x])["fvu"]

    child = {"train": str(work / "train.safetensors"), "test": str(work / "test.safetensors"), "batch": a.batch,
             "steps": a.steps, "d_sae": d_sae, "k": a.k, "lr": a.lr, "threads": a.threads, "dead_window": 100}
    py = Path(a.venv) / "bin" / "python"
    out = subprocess.run([str(py), "-c", _CHILD, json.dumps(child)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"SAELens side failed:\n{out.stderr[-3000:]}")
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"cached activations: {a.acts} ({store.info.get('model')} {store.info.get('hook_name')}), "
          f"d_in {d_in}, d_sae {d_sae}, k {a.k}, batch {a.batch}, {a.steps} steps = {tokens} tokens, "
          f"{a.threads} thread(s), held-out {len(test_x)} tokens")
    print(f"{'trainer':<12}{'tokens/s':>10}{'FVU':>8}")
    print(f"{'headscope':<12}{tokens / ours_s:>10.0f}{ours_fvu:>8.3f}")
    print(f"{'SAELens':<12}{tokens / theirs['seconds']:>10.0f}{theirs['fvu']:>8.3f}")
    print(f"throughput ratio headscope/SAELens: {theirs['seconds'] / ours_s:.2f}x")


if __name__ == "__main__":
    main()

"""SAELens interop, both directions, with sae-lens itself in its own virtual environment
(sae-lens needs transformer-lens < 4, which cannot live beside ours).

    python benchmarks/saelens_interop.py [--venv /tmp/saelens-venv] [--write-test-data]

1. creates the venv if missing (`pip install torch==2.13.0 sae-lens`);
2. ours -> SAELens: we save a TopK and a ReLU ("standard") SAE (d_in 16, d_sae 32) with
   headscope.sae.saelens_format; SAELens' `SAE.load_from_disk` loads them in the venv and encodes /
   decodes fixed inputs; the outputs must equal ours;
3. SAELens -> ours: SAELens builds and `save_model`s a TopK, a standard and a JumpReLU SAE with
   random weights plus its outputs on the same inputs; our `load_sae` reads them and must match.
With --write-test-data the SAELens-written directories and outputs go to tests/data/saelens/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headscope.sae.architectures import SAE, SAEConfig
from headscope.sae.saelens_format import load_sae, save_sae

REPO = Path(__file__).resolve().parents[1]

_CHILD = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
report = {"sae_lens_version": sae_lens.__version__}
# direction 1: SAEs we saved
for name in ("ours_topk", "ours_relu"):
    sae = SAE.load_from_disk(str(work / name))
    with torch.no_grad():
        f = sae.encode(x)
        save_file({"f": f.contiguous(), "x_hat": sae.decode(f).contiguous()}, str(work / f"{name}_saelens_out.safetensors"))
    report[name] = type(sae).__name__
# direction 2: SAEs SAELens saves
torch.manual_seed(0)
made = {
    "saelens_topk": TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)),
    "saelens_standard": StandardSAE(StandardSAEConfig(d_in=16, d_sae=32)),
    "saelens_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=32)),
}
for name, sae in made.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.2)
        sae.save_model(str(work / name))
        f = sae.encode(x)
        save_file({"f": f.contiguous(), "x_hat": sae.decode(f).contiguous()}, str(work / name / "expected.safetensors"))
    report[name] = type(sae).__name__
print(json.dumps(report))
'''


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "sae-lens"], check=True)
    return py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default="/tmp/saelens-venv")
    ap.add_argument("--write-test-data", action="store_true")
    a = ap.parse_args()
    py = ensure_venv(Path(a.venv))
    work = Path(tempfile.mkdtemp(prefix="saelens-interop-"))
    torch.manual_seed(1)
    x = torch.randn(10, 16)
    save_file({"x": x}, str(work / "inputs.safetensors"))
    ours = {}
    for arch, name in (("topk", "ours_topk"), ("relu", "ours_relu")):
        s = SAE(SAEConfig(d_in=16, d_sae=32, arch=arch, k=4, model="toy", layer=0, site="resid"))
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.3 * torch.randn_like(p))
        s.eval()
        save_sae(s, work / name, log_sparsity=torch.full((32,), -2.0))
        ours[name] = s
    out = subprocess.run([str(py), "-c", _CHILD, str(work)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"SAELens side failed:\n{out.stderr[-3000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for name, s in ours.items():
        got = load_file(str(work / f"{name}_saelens_out.safetensors"))
        with torch.no_grad():
            mine = s(x)
        err = max(float((got["f"] - mine["f"]).abs().max()), float((got["x_hat"] - mine["x_hat"]).abs().max()))
        rows.append(("ours -> SAELens", name, report[name], err))
    for name in ("saelens_topk", "saelens_standard", "saelens_jumprelu"):
        back = load_sae(work / name)
        exp = load_file(str(work / name / "expected.safetensors"))
        with torch.no_grad():
            mine = back(x)
        err = max(float((exp["f"] - mine["f"]).abs().max()), float((exp["x_hat"] - mine["x_hat"]).abs().max()))
        rows.append(("SAELens -> ours", name, back.cfg.arch, err))
    print(f"sae-lens {report['sae_lens_version']} (venv {a.venv})")
    print(f"{'direction':<18}{'SAE':<20}{'loaded as':<14}max |diff| (f and x_hat)")
    for r in rows:
        print(f"{r[0]:<18}{r[1]:<20}{r[2]:<14}{r[3]:.2e}")
    ok = all(r[3] < 1e-5 for r in rows)
    print("interop:", "OK" if ok else "MISMATCH")
    if a.write_test_data:
        dst = REPO / "tests" / "data" / "saelens"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "inputs.safetensors", dst / "inputs.safetensors")
        for name in ("saelens_topk", "saelens_standard", "saelens_jumprelu"):
            shutil.rmtree(dst / name, ignore_errors=True)
            shutil.copytree(work / name, dst / name)
        for name in ours:
            shutil.copy(work / f"{name}_saelens_out.safetensors", dst / f"{name}_saelens_out.safetensors")
            shutil.rmtree(dst / name, ignore_errors=True)
            shutil.copytree(work / name, dst / name)
        (dst / "README.md").write_text(
            f"Written by benchmarks/saelens_interop.py with sae-lens {report['sae_lens_version']}: "
            "saelens_* = SAEs saved by SAELens' save_model (expected.safetensors = SAELens' own encode/decode "
            "of inputs.safetensors); ours_* = SAEs saved by headscope, *_saelens_out = what SAELens' "
            "load_from_disk + encode/decode gave for them.\n")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

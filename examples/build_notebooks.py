"""Generate the example notebooks (run: python examples/build_notebooks.py).

The notebooks are written from the cell sources below so that they stay reviewable in diffs, and
committed without outputs. Each reads HEADSCOPE_EXAMPLE_SMALL=1 (set by tests/test_notebooks.py in
CI) to run at small sizes; without it they run the sizes a researcher would use.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os

import plotly.express as px
import torch

from headscope.probe import StatsRequest, load_model

SMALL = os.environ.get("HEADSCOPE_EXAMPLE_SMALL") == "1"  # CI runs every notebook at small sizes
model = load_model()  # the embedded SmolLM2-135M-Instruct: 30 layers x 9 heads, 3 kv heads
model"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_quickstart"] = [
    ("md", """# Quickstart: record every head, then rank heads

headscope records per-head attention **statistics** for every head in one forward pass, without
materialising the S x S attention matrix, and ranks heads by kind (previous-token, induction, sink,
...) with detectors that also check their findings causally."""),
    ("code", SETUP),
    ("md", """## Record statistics of every head
`model.record(...)` is a context manager around any forward call; each statistic comes back as
`[batch, layers, heads, positions]` (`offset_mass` has one more axis, one entry per requested offset;
`argmax` / `max_prob` one per top-k entry)."""),
    ("code", """batch = model.tokenize(["The quick brown fox jumps over the lazy dog. The quick brown fox"], prepend_bos=True)
request = StatsRequest(entropy=True, sink_k=1, offsets=(1,))
with torch.no_grad(), model.record(request) as rec:
    model(**batch)
{name: tuple(t.shape) for name, t in rec.stats.items()}"""),
    ("code", """# Mean attention to the previous token, per head ([L, H]). Position 0 (BOS) has no previous token and
# position 1's previous token is the BOS sink, so queries start at 2 (as in the previous_token detector).
prev = rec.stats["offset_mass"][..., 0]  # [B, L, H, S]
prev_grid = prev[..., 2:].mean(dim=(0, 3))
assert prev_grid.shape == (model.meta.n_layers, model.meta.n_heads)
px.imshow(prev_grid.T, labels=dict(x="layer", y="head", color="previous-token mass"),
          title="previous-token mass on one prompt")"""),
    ("md", "## One head's full pattern (only for the heads and lengths you ask for)"),
    ("code", """layer, head = divmod(int(prev_grid.argmax()), model.meta.n_heads)
with torch.no_grad(), model.record(patterns={"layers": [layer], "heads": [head]}) as rec:
    model(**batch)
pattern = rec.pattern(layer, head)[0]  # [S, S]
labels = [f"{i}:{model.tokenizer.decode([t])}" for i, t in enumerate(batch["input_ids"][0].tolist())]
assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[0]), atol=1e-5)
px.imshow(pattern, x=labels, y=labels, title=f"layer {layer} head {head}", color_continuous_scale="Blues")"""),
    ("md", """## Rank heads with a detector
Every detector returns a `DetectorResult`: `.scores` is a `HeadScores` table (one row per head) and,
with `validate=True`, `.validation` is a causal check: ablating its top-k heads must hurt the behaviour
more than ablating random heads.
`headscope rank` on the command line runs all of them and writes an HTML report; open it with
`headscope explore --report headscope-report`."""),
    ("code", """from headscope.circuits import DetectorConfig, run_detector, top_heads

config = DetectorConfig(seq_len=32 if SMALL else 128, n_prompts=2 if SMALL else 16, validate=not SMALL,
                        progress=False)
result = run_detector(model, "previous_token", config)
result.scores.head(10)"""),
    ("code", """best = top_heads(result.scores, 5)
print("top previous-token heads:", best)
assert result.scores["score"].max() > 0.5  # this model has strong previous-token heads
if result.validation is not None:
    print(result.validation.verdict())"""),
]

NOTEBOOKS["02_induction_and_previous_token"] = [
    ("md", """# Induction and previous-token heads

On `[BOS] r r` (r = T random tokens repeated), an induction head at a token of the second copy
attends to the token that *followed* that token's earlier copy: offset T - 1. Previous-token heads
(offset 1) feed them. We score both, look at the top induction head's pattern, and check causally
that ablating the top induction heads breaks in-context copying."""),
    ("code", SETUP),
    ("code", """from headscope.circuits import DetectorConfig, ablate_heads, run_detector, top_heads

# Small: period 20 and Olsson's prefix matching on 10 tokens x 2; full: the published 50 and 25 x 4.
config = DetectorConfig(seq_len=41 if SMALL else None, n_prompts=2 if SMALL else 16, top_k=8, validate=not SMALL,
                        progress=False, params={"prefix_period": 10, "prefix_repeats": 2} if SMALL else {})
induction = run_detector(model, "induction", config)
induction.scores.head(8)"""),
    ("code", """print(induction.summary["definition"])
if induction.validation is not None:  # top-8 vs random 8-head sets (the next cells do one such check by hand)
    print(induction.validation.verdict())
    assert induction.validation.top_k_damage > induction.validation.random_median"""),
    ("code", """from headscope.circuits.scores import score_grid

grid = score_grid(induction.scores, model.meta.n_layers, model.meta.n_heads)
px.imshow(grid.T, labels=dict(x="layer", y="head", color="score"), title="induction score (offset T-1 mass)")"""),
    ("md", "## The top induction head on one repeated sequence"),
    ("code", """from headscope.circuits.prompts import repeated_random_tokens

T = 20
ids = repeated_random_tokens(model.tokenizer, 1, T, seed=1)  # [1, 1 + 2T]
layer, head = top_heads(induction.scores, 1)[0]
_, rec = model.run_recorded(ids, None, StatsRequest(), patterns={"layers": [layer], "heads": [head]})
pattern = rec.pattern(layer, head)[0]
second = torch.arange(T + 1, 2 * T + 1)
on_target = pattern[second, second - (T - 1)].mean()
print(f"layer {layer} head {head}: mean attention on the induction target {on_target:.2f}")
px.imshow(pattern, title=f"induction head L{layer}H{head} on [BOS] r r (T={T})", color_continuous_scale="Blues")"""),
    ("md", """## Loss on the repeated half, with and without the top induction heads
Ablating any 8 heads may cost some loss, so 8 random heads from outside the top 8 are the control
(`validate=True` does the same over several random sets)."""),
    ("code", """from headscope.circuits.validation import random_head_sets

def repeated_half_loss(m, ids):
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits
    lp = torch.log_softmax(logits[:, T + 1:-1].float(), -1)
    return float(-lp.gather(-1, ids[:, T + 2:, None]).mean())

ids = repeated_random_tokens(model.tokenizer, 2 if SMALL else 8, T, seed=2)
clean = repeated_half_loss(model, ids)
top8 = top_heads(induction.scores, 8)
with ablate_heads(model, top8):
    ablated = repeated_half_loss(model, ids)
random8 = random_head_sets(model.meta.n_layers, model.meta.n_heads, 8, 1, seed=0, exclude=top8)[0]
with ablate_heads(model, random8):
    control = repeated_half_loss(model, ids)
print(f"loss on the repeated half: {clean:.3f} nats/token; {ablated:.3f} with the top-8 induction heads ablated, "
      f"{control:.3f} with 8 random other heads ablated")
assert ablated - clean > control - clean"""),
    ("code", """previous = run_detector(model, "previous_token", DetectorConfig(seq_len=32 if SMALL else 128, n_prompts=2 if SMALL else 16,
                                                                validate=False, progress=False))
print("previous-token heads:", top_heads(previous.scores, 5))
print("induction heads:     ", top_heads(induction.scores, 5))
# Induction needs previous-token information at the keys, so previous-token heads sit in earlier layers.
print("median layer, previous-token top-5 vs induction top-5:",
      sorted(l for l, _ in top_heads(previous.scores, 5))[2], sorted(l for l, _ in top_heads(induction.scores, 5))[2])"""),
]

NOTEBOOKS["03_retrieval_long_context"] = [
    ("md", """# Retrieval heads at long context (Wu et al. 2024)

A needle (a fact) is hidden in a long haystack; the model is asked for it. While the model decodes
the answer, a retrieval head's most-attended key lies inside the needle and holds the token being
copied. Statistics (argmax) are enough: no S x S matrix, so this runs at thousands of tokens on a CPU."""),
    ("code", SETUP),
    ("code", """from headscope.circuits import DetectorConfig, run_detector, top_heads

config = DetectorConfig(seq_len=128 if SMALL else 2048, n_prompts=2 if SMALL else 8, validate=not SMALL,
                        progress=False, params={"depths": (0.5,)} if SMALL else {})
retrieval = run_detector(model, "retrieval", config)
retrieval.summary"""),
    ("code", """retrieval.scores.head(10)"""),
    ("code", """from headscope.circuits.scores import score_grid

grid = score_grid(retrieval.scores, model.meta.n_layers, model.meta.n_heads)
print("heads with retrieval score > 0.1:", int((grid > 0.1).sum()), "of", grid.size)
if retrieval.validation is not None:
    print(retrieval.validation.verdict())
px.imshow(grid.T, labels=dict(x="layer", y="head", color="retrieval score"), title="retrieval score")"""),
]

NOTEBOOKS["04_sink_heads_and_calibration"] = [
    ("md", """# Attention sinks and attention calibration (Gu et al. 2024; ACT, Yu et al. 2024)

Most heads park attention on the first token (the sink). Gu et al.'s alpha is the mean attention key 0
receives; Sink_1^0.3 is the fraction of heads with alpha > 0.3. ACT finds sink tokens beyond position 0
and scales the attention they get by beta = 0.4 in chosen heads, giving the freed mass to the other keys."""),
    ("code", SETUP),
    ("code", """from headscope.circuits import DetectorConfig, run_detector

sink = run_detector(model, "sink", DetectorConfig(n_prompts=4 if SMALL else 64, validate=not SMALL, progress=False,
                                                  params={"compare_no_bos": not SMALL}))
sink.summary"""),
    ("code", """from headscope.circuits.scores import score_grid

alpha = score_grid(sink.scores, model.meta.n_layers, model.meta.n_heads)
print(f"Sink_1^0.3 = {(alpha > 0.3).mean():.1%} of heads")
if sink.validation is not None:  # removing the sink (beta = 0) in the top heads vs in random heads
    print(sink.validation.verdict())
px.imshow(alpha.T, labels=dict(x="layer", y="head", color="alpha"), title="sink alpha per head")"""),
    ("md", """## Calibrating heads
ACT's sinks depend on the input, so `calibrate` takes the batch it will run. With beta = 1 nothing changes."""),
    ("code", """from headscope.circuits.calibration import calibrate, candidate_heads

text = "The capital of France is Paris. The capital of Italy is"
prompt = model.tokenize(text, prepend_bos=True)
# ACT leaves each head's first sink (normally BOS) alone, so the top-alpha heads above, whose sink is BOS,
# have nothing to calibrate: take the heads with sinks beyond the first on this prompt. (On a prompt this
# short the rule, mean received attention > 0.1, flags many keys: late keys are seen by few queries.)
heads = candidate_heads(model, [{"prompt": text}], limit=4)
with torch.no_grad():
    before = torch.softmax(model(**prompt).logits[0, -1], -1)
    with calibrate(model, heads, prompt, beta=0.4) as sinks:
        after = torch.softmax(model(**prompt).logits[0, -1], -1)
    with calibrate(model, heads, prompt, beta=1.0):
        same = torch.softmax(model(**prompt).logits[0, -1], -1)
assert torch.allclose(same, before, atol=1e-6) and not torch.allclose(after, before, atol=1e-6)
print("sink keys scaled per head:", {(l, h): sinks[l][0, h].nonzero()[:, 0].tolist() for l, h in heads})
for name, p in (("before", before), ("after", after)):
    top = p.topk(5)
    print(name, [(model.tokenizer.decode([int(i)]), round(float(v), 3)) for v, i in zip(top.values, top.indices)])"""),
    ("md", """## Choosing heads on a task (ACT's head selection)
Calibrate one candidate head at a time on a calibration split and keep the heads that raise accuracy;
then measure on a held-out split."""),
    ("code", """from headscope.circuits.calibration import accuracy, select_heads
from headscope.circuits.next_token import load_jsonl

items = load_jsonl("sentiment.jsonl")
calib, test = items[: 8 if SMALL else len(items) // 2], items[len(items) // 2:][: 8 if SMALL else None]
candidates = candidate_heads(model, calib)[: 2 if SMALL else 20]
selection = select_heads(model, calib, candidates)
kept = selection.attrs["heads"]
print(selection)
print(f"held-out accuracy ({len(test)} prompts): {accuracy(model, test):.3f} ->",
      f"{accuracy(model, test, heads=kept):.3f} with {len(kept)} calibrated heads" if kept else "(no head kept)")"""),
]

NOTEBOOKS["05_pruning_curve"] = [
    ("md", """# Head importance and the pruning curve (Michel et al. 2019)

A gate on every head's output; importance = E|dL/dgate|. Prune the least important 10% of heads,
re-estimate, repeat, and watch the loss. Then remove the heads physically: a smaller model that gives
the same logits as masking them."""),
    ("code", SETUP),
    ("code", """from headscope.sae.corpus import default_corpus

texts = list(default_corpus(4 if SMALL else 32, seed=0))
from headscope.circuits.importance import head_importance, iterative_pruning, pruning_figure

importance = head_importance(model, texts)
px.imshow(importance.T, labels=dict(x="layer", y="head", color="importance"), title="head importance")"""),
    ("code", """curve = iterative_pruning(model, texts, step=0.1, max_fraction=0.2 if SMALL else 0.5)
print(curve[["step", "n_pruned", "fraction", "metric"]])
assert curve["metric"].iloc[-1] > curve["metric"].iloc[0]  # pruning costs loss
pruning_figure(curve)"""),
    ("code", """from headscope.circuits import ablate_heads
from headscope.circuits.pruning import n_attention_params, prune

heads = curve["heads"].iloc[1]
small = prune(model, heads)
batch = model.tokenize(texts[0][:400], prepend_bos=True)
with torch.no_grad():
    with ablate_heads(model, heads):
        masked = model(**batch).logits
    pruned = small(**batch).logits
# A layer keeps as many query slots per kv group as its fullest group (the others get zero padding heads),
# so parameters shrink only where every kv group of a layer lost a head (circuits/pruning.py).
print(f"{len(heads)} heads removed: attention parameters {n_attention_params(model):,} -> {n_attention_params(small):,}")
print("max |logit difference| pruned vs masked:", float((pruned - masked).abs().max()))
assert torch.allclose(pruned, masked, atol=1e-4)"""),
]

NOTEBOOKS["06_memory_injection"] = [
    ("md", """# Memory injection (Sakarvadia et al. 2023)

Multi-hop questions fail when the model does not recall the intermediate fact. Adding tau times the
summed embeddings of the missing words ("France") to one layer's attention output can bring it back.
We sweep layers x tau and compare with a control that injects unrelated words."""),
    ("code", SETUP),
    ("code", """from headscope.circuits.memory_injection import answer_probs, inject_memory, injection_sweep, sweep_heatmap
from headscope.circuits.next_token import load_jsonl

items = load_jsonl("multihop.jsonl")[: 4 if SMALL else None]
print(len(items), "prompts, e.g.", items[0])"""),
    ("code", """item = items[0]
base = answer_probs(model, [item["question"]], [item["answer"]])
with inject_memory(model, item["memory"], layer=6, tau=4):
    injected = answer_probs(model, [item["question"]], [item["answer"]])
print(f"p({item['answer']!r}) {float(base):.4f} -> {float(injected):.4f} after injecting {item['memory']!r}")"""),
    ("code", """layers = [6] if SMALL else range(model.meta.n_layers)
taus = [1, 4] if SMALL else range(1, 16)
sweep = injection_sweep(model, items, layers=layers, taus=taus)
control = injection_sweep(model, items, layers=layers, taus=taus, control=True)
best = sweep.loc[sweep["median_rel_change"].idxmax()]
print(f"best: layer {int(best.layer)}, tau {best.tau}: median relative change {best.median_rel_change:+.1%}")
print("control (unrelated words) at that setting:",
      f"{control.set_index(['layer', 'tau']).loc[(best.layer, best.tau), 'median_rel_change']:+.1%}")
sweep_heatmap(sweep)"""),
]

NOTEBOOKS["07_sae_on_head_outputs"] = [
    ("md", """# A sparse autoencoder on one layer's head outputs (Kissane et al. 2024)

Concatenate the per-head outputs z of a layer, train a TopK SAE on them, and attribute each latent to
heads by the share of its decoder norm in each head's block."""),
    ("code", SETUP),
    ("code", """from headscope.sae.activations import collect
from headscope.sae.architectures import SAEConfig
from headscope.sae.corpus import default_corpus, packed_batches
from headscope.sae.train import TrainConfig, new_sae, train

layer = 6
n_tokens = 8192 if SMALL else 1_000_000
batches = packed_batches(model.tokenizer, default_corpus(seed=0), seq_len=128, batch_size=16,
                         bos_id=model.tokenizer.bos_token_id)
store = collect(model, layer, "z", batches, n_tokens, progress=False)
meta = model.meta
cfg = SAEConfig(d_in=meta.n_heads * meta.head_dim, d_sae=(4 if SMALL else 16) * meta.n_heads * meta.head_dim,
                arch="topk", k=32, model=meta.name, layer=layer, site="z", n_heads=meta.n_heads,
                head_dim=meta.head_dim)
tc = TrainConfig(total_tokens=n_tokens, batch_size=512 if SMALL else 1024)
result = train(new_sae(cfg, store, tc), store, tc)
result.final"""),
    ("code", """from headscope.sae.metrics import head_attribution, top_activating
from headscope.sae.saelens_format import load_sae, save_sae

sae = result.sae
assert result.final["fvu"] < 1.0  # better than predicting the mean
shares = head_attribution(sae)  # [d_sae, H]: share of each latent's decoder norm per head (rows sum to 1)
main_share = shares.max(-1).values  # 1 = the latent lives in one head; 1/H = spread evenly over the heads
print(f"latents with more than half their decoder norm in one head: {(main_share > 0.5).float().mean():.1%}")
fig = px.histogram(x=main_share.numpy(), nbins=50, labels={"x": "largest share of the decoder norm in one head"},
                   title=f"layer {layer}: how head-specific each latent is (dashed: 1/{meta.n_heads}, spread evenly)")
fig.add_vline(x=1 / meta.n_heads, line_dash="dash")
fig"""),
    ("code", """# Save in the SAELens format (browse it with `headscope explore --sae sae-L6`), reload, look at a latent.
path = save_sae(sae, "sae-L6")
again = load_sae(path)
assert torch.equal(again.W_dec, sae.W_dec)
docs = packed_batches(model.tokenizer, default_corpus(8 if SMALL else 64, seed=1), seq_len=128, batch_size=2,
                      bos_id=model.tokenizer.bos_token_id)
with torch.no_grad():
    fired = (again.encode(store.sample(2048)) > 0).float().mean(0)  # firing frequency per latent
latent = int(fired.argmax())
print(f"latent {latent} fires on {fired[latent]:.1%} of tokens; {shares[latent].max():.0%} of its decoder norm "
      f"is in head {int(shares[latent].argmax())}")
import pandas as pd
contexts = pd.DataFrame(top_activating(model, again, layer, docs, [latent], n=5), columns=["activation", "context"])
assert len(contexts) > 0
contexts"""),
]

NOTEBOOKS["08_temporal_value_edit"] = [
    ("md", """# Value-vector editing at one position (Park et al. 2025, "Temporal Heads")

The temporal-heads paper edits one head at a time: it averages the head's value vectors over a
source prompt ("In 2009, the president of South Korea was") and adds that mean to the head's value
vector at the year token of a target prompt, then asks whether the answer changes. headscope does
the same edit inside the attention call, for any head, without rewriting the cached values: each
query i of the head gets p(i -> year token) x delta added to its output (exact: p does not depend on
v), which keeps the edit to one query head under GQA and carries it into generated tokens.

Here the cases come from our temporal facts: the target is a fact's prompt with the *other* year,
edited at that year with the values of the fact's own prompt, and the wanted answer is the fact's
answer (the target's own answer differs)."""),
    ("code", SETUP),
    ("code", """from headscope.circuits.temporal import load_facts, phrase_positions, prompt_ids
from headscope.circuits.value_edit import cases_from_facts, edit_values, value_edit_sweep, value_means, sweep_heatmap

cases = cases_from_facts(load_facts(kind="temporal"))[: 2 if SMALL else 12]
case = cases[0]
print(case)"""),
    ("code", """# One edit by hand: head (12, 4), coefficient 6, at the last token of the target's year.
head = (12, 4)
ids = torch.tensor([prompt_ids(model, case.target)])
pos = phrase_positions(model, case.target, case.phrase)[-1]
delta = 6 * value_means(model, case.source, [head])[head]
with torch.no_grad():
    before = model.hf(input_ids=ids, use_cache=False).logits[0].float()
    with edit_values(model, {head: delta}, pos):
        after = model.hf(input_ids=ids, use_cache=False).logits[0].float()
moved = (after - before).abs().amax(-1)
print("largest logit change at each position:", [round(float(m), 4) for m in moved])
# causal attention: positions before the edited token cannot see it
assert moved[:pos].max() < 1e-3 < moved[pos:].max()"""),
    ("code", """heads = [(l, h) for l in range(0, 30, 10) for h in range(3)] if SMALL else None  # None: all 270 heads
# control=True (the default) runs every edit a second time with the target's own value means: the same
# push without the source's content. specific_change = logprob_change - control_change.
sweep = value_edit_sweep(model, cases, heads=heads, coeffs=(6.0,))
per_head = sweep.groupby(["layer", "head"])[["logprob_change", "control_change", "specific_change"]].median()
print("baseline:", sweep.attrs["baseline"][0])
print("heads whose edit raises the wanted answer's log-prob most (median over cases), beside their control:")
print(per_head.sort_values("logprob_change", ascending=False).head(8).round(3).to_string())
print(f"first token changed in {sweep.first_token_changed.mean():.1%} of single-head edits; "
      f"the wanted answer became the first token in {sweep.answer_first.sum()} of {len(sweep)}")"""),
    ("code", """sweep_heatmap(sweep, model.meta.n_layers, model.meta.n_heads)  # median specific_change per head"""),
    ("md", """How to read it: a head whose edit raises the answer well beyond its control reads year
information at the year token and writes it where later layers use it. On this 135M model the
controls move the answer almost as much as the real edits (RESULTS.md: coefficient 6, the ten best
heads +0.04-0.11 nats, their controls +0.04-0.09), so what the raw sweep shows is mostly which heads
are sensitive to a push at that token. Even a specific effect is evidence about what a head *can*
carry when pushed far outside its range, not that the model uses it: the causal test of use is
ablation (`run_detector(model, "temporal")` ablates the top heads against random ones)."""),
]


def build(names=None) -> list[Path]:
    out = []
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        made = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(made):
            cell["id"] = f"cell-{i:02d}"  # fixed ids: rebuilding gives identical files
        nb = new_notebook(cells=made,
                          metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                    "language_info": {"name": "python"}})
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in build():
        print("wrote", p.relative_to(HERE.parent))

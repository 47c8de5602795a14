"""What a caller asks the attention computation to measure (`StatsRequest`) and the shapes it gets back.

Every statistic is per query row i over the keys j that row may see (causal, window, padding),
with p = softmax of the row (after any intervention). Output shapes, per attention call, for
q of shape [B, H, Sq, D] and k of shape [B, Hkv, Sk, D]:

| key | shape | meaning |
|---|---|---|
| lse | [B, H, Sq] | log sum_j exp(s_ij); -inf for a row that sees no key |
| entropy | [B, H, Sq] | -sum_j p_ij log p_ij |
| argmax | [B, H, Sq, k] int64 | top-k key positions (-1 where the row has fewer keys) |
| max_prob | [B, H, Sq, k] | their probabilities |
| sink_mass | [B, H, Sq] | attention on the `sink_k` key positions from the first non-padded key on (padded keys among them get none) |
| offset_mass | [B, H, Sq, n] | p_{i, i-c} for each requested offset c |
| match_mass, match_count | [B, H, Sq] | mass / number of keys j < i with tok_j == tok_i |
| next_match_mass, next_match_count | [B, H, Sq] | mass / number of keys j <= i with tok_{j-1} == tok_i |
| keyset_mass | [B, H, Sq] | mass on a per-sequence key set |
| content_mass | [B, H, Sq] | mass on keys that are neither sink keys (first `sink_k`) nor the query itself |
| colsum | [B, H, Sk] | sum_i p_ij: attention each key receives |

What each statistic costs on the GPU kernel (H200, causal bf16, head_dim 64, 64k tokens x 32 heads;
time added to the forward with the statistics listed before it; benchmarks/RESULTS.md, run 37):
output only 39.4 ms (SDPA flash: 55.8 ms); lse +0.4%; entropy +12%; top-1 +19%; sink and one offset +1%;
keyset +9%; match +3% and next_match +7% (their pair pass); colsum, a second pass, 0.4x of all of
that. At head_dim 128 the shares are smaller. Leave out what an analysis does not read.

Query i sits at absolute key position Sk - Sq + i (queries are the last Sq positions, as in
cached decoding). Rows of padded queries see nothing: masses 0, lse -inf, argmax -1. Heads
ablated with `head_mask` mode "zero" skip their work: their statistics are NaN (argmax -1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import KernelInputError

ONE_PASS = ("lse", "entropy", "argmax", "max_prob", "sink_mass", "offset_mass", "match_mass",
            "match_count", "next_match_mass", "next_match_count", "keyset_mass", "content_mass")
TWO_PASS = ("colsum",)
COUNT_STATS = ("match_count", "next_match_count")
# Statistics indexed by key position rather than query position.
KEY_STATS = ("colsum",)


@dataclass(frozen=True)
class StatsRequest:
    """Which attention statistics to compute (see module docstring for definitions and shapes).

    Only the requested statistics cost anything. `topk` > 0 yields `argmax` and `max_prob`
    with that many entries per row; `sink_k` > 0 yields `sink_mass` over the `sink_k` key
    positions starting at the first non-padded key; a non-empty `offsets` yields `offset_mass`
    (1 = previous token).
    """

    lse: bool = False
    entropy: bool = False
    topk: int = 0
    sink_k: int = 0
    offsets: tuple[int, ...] = ()
    match: bool = False
    next_match: bool = False
    keyset: bool = False
    colsum: bool = False
    content: bool = False

    def __post_init__(self):
        if self.topk < 0 or self.topk > 64:
            raise KernelInputError(f"topk must be in 0..64 (got {self.topk}); use patterns for full rows.")
        if self.sink_k < 0:
            raise KernelInputError(f"sink_k must be >= 0 (got {self.sink_k}).")
        object.__setattr__(self, "offsets", tuple(int(c) for c in self.offsets))

    @classmethod
    def all(cls, *, topk: int = 1, sink_k: int = 1, offsets=(1,), keyset: bool = False,
            colsum: bool = True, content: bool = False) -> "StatsRequest":
        """Every statistic of DESIGN.md's table, token comparisons included (they need token ids);
        keyset_mass needs a key set and content_mass (exact small remainders for TransformerLens'
        exclusions) is one more pass, so both are opt-in."""
        return cls(lse=True, entropy=True, topk=topk, sink_k=sink_k, offsets=tuple(offsets),
                   match=True, next_match=True, keyset=keyset, colsum=colsum, content=content)

    @property
    def needs_tokens(self) -> bool:
        return self.match or self.next_match

    @property
    def empty(self) -> bool:
        return not self.names()

    def names(self) -> list[str]:
        """Keys of the statistics this request produces, in a fixed order."""
        out = []
        if self.lse:
            out.append("lse")
        if self.entropy:
            out.append("entropy")
        if self.topk:
            out += ["argmax", "max_prob"]
        if self.sink_k:
            out.append("sink_mass")
        if self.offsets:
            out.append("offset_mass")
        if self.match:
            out += ["match_mass", "match_count"]
        if self.next_match:
            out += ["next_match_mass", "next_match_count"]
        if self.keyset:
            out.append("keyset_mass")
        if self.content:
            out.append("content_mass")
        if self.colsum:
            out.append("colsum")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offsets"] = list(self.offsets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StatsRequest":
        d = dict(d)
        d["offsets"] = tuple(d.get("offsets", ()))
        return cls(**d)

"""What `headscope rank` runs: command-line flags merged over a --config TOML file, and the
`DetectorConfig` each detector receives.

Config file (every key optional; command-line flags win over it):

    model = "/path/to/local/model"      # or a hub id; absent = the embedded SmolLM2
    kinds = ["sink", "previous_token"]  # detectors to run (the --detectors flag)
    seq_len = 64
    n_prompts = 16
    batch_size = 8
    device = "cpu"
    dtype = "float32"
    seed = 0
    top_k = 8
    n_random = 5
    validate = true
    ablate_each = false                 # also ablate each top head alone (ablation_delta column)
    out = "headscope-report"
    prompts = "my_prompts.txt"

    [detectors.sink]                    # per-detector: DetectorConfig fields or the detector's params
    eps = 0.3
    [detectors.retrieval]
    seq_len = 8192
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field

import torch

from headscope.circuits.detectors import DetectorConfig, check_params, get_detector
from headscope.circuits.scores import KINDS
from headscope.probe.errors import InputError

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Per-kind sizes for the default `headscope rank` run, chosen so that all six detectors finish in
# under 3 minutes on a 2-core CPU (benchmarks/rank_bench.py); explicit flags or config values win.
CLI_DEFAULTS: dict[str, dict] = {
    "sink": {"n_prompts": 16, "validation_prompts": 8},        # T = 64 as Gu et al.; 16 x 64 tokens
    "previous_token": {"n_prompts": 8, "validation_prompts": 4},
    "induction": {"n_prompts": 8, "validation_prompts": 4},
    "duplicate_token": {"n_prompts": 8, "validation_prompts": 4},
    # patching every head on 24 facts took 176 s of a 259 s default run (RESULTS.md); 8 keeps the
    # ranking usable and the default run under 3 minutes; --n-prompts or the config file restore more
    "temporal": {"n_prompts": 8},
}
# Beyond LONG_SEQ tokens the prompt counts above would cost hours on a CPU: prompts are scaled down
# to LONG_TOKEN_BUDGET tokens per pass, one prompt per batch (flags and config values still win).
LONG_SEQ, LONG_TOKEN_BUDGET = 2048, 16384
LONG_DEFAULTS: dict[str, dict] = {"sink": {"batch_size": 1, "validation_prompts": 1, "compare_no_bos": False}}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(DetectorConfig)} - {"params", "progress"}
_TOP_LEVEL = {"model", "kinds", "seq_len", "n_prompts", "batch_size", "device", "device_map", "dtype", "seed",
              "top_k", "n_random", "validate", "ablate_each", "out", "prompts", "quiet", "detectors"}


@dataclass
class RankOptions:
    """Resolved options of one `headscope rank` run."""

    model: str | None = None
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seq_len: int | None = None
    n_prompts: int | None = None
    batch_size: int | None = None
    device: str = "cpu"
    device_map: str | None = None
    dtype: str = "float32"
    seed: int = 0
    top_k: int = 8
    n_random: int = 5
    validate: bool = True
    ablate_each: bool = False
    out: str = "headscope-report"
    prompts: str | None = None
    quiet: bool = False
    per_kind: dict[str, dict] = field(default_factory=dict)
    from_flags: set[str] = field(default_factory=set)  # options given on the command line

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def detector_config(self, kind: str) -> DetectorConfig:
        """The DetectorConfig for one kind. Precedence, highest first: a command-line flag, the
        file's [detectors.<kind>] table, the file's top level, CLI_DEFAULTS[kind], the detector's
        own default. Table keys that are not DetectorConfig fields go to `params`."""
        table = self.per_kind.get(kind, {})
        defaults = dict(CLI_DEFAULTS.get(kind, {}))
        seq_len = self.seq_len if "seq_len" in self.from_flags else table.get("seq_len", self.seq_len)
        if seq_len is not None and seq_len >= LONG_SEQ:
            defaults.update(n_prompts=max(1, LONG_TOKEN_BUDGET // seq_len), **LONG_DEFAULTS.get(kind, {}))
        cfg = {k: v for k, v in defaults.items() if k in _CONFIG_FIELDS}
        params = {k: v for k, v in defaults.items() if k not in _CONFIG_FIELDS}
        for name in ("seq_len", "n_prompts", "batch_size", "seed", "top_k", "n_random", "validate", "ablate_each"):
            if getattr(self, name) is not None:
                cfg[name] = getattr(self, name)
        for k, v in table.items():
            if k in self.from_flags:
                continue
            (cfg if k in _CONFIG_FIELDS else params)[k] = v
        cfg["progress"] = not self.quiet
        if self.prompts is not None or "prompts_file" not in cfg:
            cfg["prompts_file"] = self.prompts  # the top-level / flag value wins over a table's
        return DetectorConfig(**cfg, params=params)


def read_config_file(path: str) -> dict:
    """Parse a --config TOML file into a flat dict of RankOptions fields."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}.") from None
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"config file {path!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_TOP_LEVEL))}.")
    per_kind = data.pop("detectors", {})
    if not isinstance(per_kind, dict) or any(not isinstance(v, dict) for v in per_kind.values()):
        raise ConfigError(f"config file {path!r}: per-detector settings go in [detectors.<kind>] tables, "
                          "and the list of detectors to run is `kinds = [...]`.")
    for kind in per_kind:
        if kind not in KINDS:
            raise ConfigError(f"config file {path!r}: [detectors.{kind}] names no detector; "
                              f"choose from {', '.join(KINDS)}.")
    data["per_kind"] = per_kind
    return data


def parse_kinds(value) -> list[str]:
    """'sink,induction' or ["sink", "induction"] or 'all' -> validated kind list (order kept, no repeats)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds = [k.strip().replace("-", "_") for k in items if str(k).strip()]
    if kinds == ["all"]:
        return list(KINDS)
    if not kinds:
        raise InputError("--detectors is empty; name at least one of " + ", ".join(KINDS) + ".")
    for k in kinds:
        if k not in KINDS:
            raise InputError(f"unknown detector {k!r}; choose from {', '.join(KINDS)} (or 'all').")
    return list(dict.fromkeys(kinds))


def resolve(args) -> RankOptions:
    """argparse Namespace (None = flag not given) over the --config file over defaults."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = set()
    for name in _TOP_LEVEL - {"kinds", "detectors"}:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
            flags.add(name)
    if getattr(args, "detectors", None) is not None:
        values["kinds"] = args.detectors
    opts = RankOptions(**values, from_flags=flags)
    opts.kinds = parse_kinds(opts.kinds)
    _check(opts)
    return opts


def _check(opts: RankOptions) -> None:
    for name in ("seq_len", "n_prompts", "batch_size", "top_k", "n_random"):
        v = getattr(opts, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}.")
    if not isinstance(opts.seed, int) or isinstance(opts.seed, bool):
        raise ConfigError(f"seed must be an integer, got {opts.seed!r}.")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"dtype {opts.dtype!r} is not one of {', '.join(DTYPES)}.")
    if opts.device_map not in (None, "auto"):
        raise ConfigError(f"device-map must be 'auto' (or absent), got {opts.device_map!r}.")
    if opts.prompts is not None:
        check_prompt_file(opts.prompts)  # readable text first; a detector's own format below
    for kind in opts.kinds:
        try:
            detector = get_detector(kind)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("headscope."):
                raise
            raise InputError(f"the {kind} detector is not available in this installation ({exc}).") from None
        dcfg = opts.detector_config(kind)
        check_params(kind, dcfg)
        if dcfg.prompts_file is not None and dcfg.prompts_file != opts.prompts:
            check_prompt_file(dcfg.prompts_file)  # set in the kind's own table
        if dcfg.prompts_file is not None and getattr(detector, "check_prompts", None) is not None:
            detector.check_prompts(dcfg.prompts_file)  # its own format (temporal: jsonl facts)
        if dcfg.prompts_file is not None and getattr(detector, "uses_prompts", True) is False:
            print(f"headscope rank: note: {kind} does not read the prompt file (it runs on repeated random "
                  "tokens).", file=sys.stderr)
        minimum = getattr(detector, "min_seq_len", None)
        if callable(minimum):
            minimum = minimum(dcfg)
        seq_len = dcfg.seq_len
        if minimum is not None and seq_len is not None and seq_len < minimum:
            raise InputError(f"--seq-len {seq_len} is too short for the {kind} detector: it needs at least "
                             f"{minimum} tokens.")


def check_prompt_file(path: str) -> None:
    """Refuse a prompt file we cannot read as UTF-8 text, or one without any text (or a dataset folder
    that load_prompts cannot read), before any work."""
    if os.path.isdir(path):
        from headscope.circuits.prompts import load_prompts

        load_prompts(path)
        return
    if not os.path.isfile(path):
        raise InputError(f"prompt file {path!r} does not exist or is not a regular file.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path!r}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise InputError(f"prompt file {path!r} is not UTF-8 text (give a .txt or .jsonl file).") from None
    if not text.strip():
        raise InputError(f"prompt file {path!r} is empty.")

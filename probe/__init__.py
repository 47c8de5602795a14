"""headscope.probe: load models and record what every attention head does.

    from headscope.probe import load_model
    from headscope.kernels import StatsRequest
    model = load_model()                        # embedded SmolLM2-135M-Instruct
    batch = model.tokenize(["The cat sat on the mat."])
    with model.record(StatsRequest.all()) as rec:
        model(**batch)
    rec.stats["entropy"]                       # [B, L, H, S]

A user's TransformerLens `TransformerBridge` or nnsight `TransformersModel` (`LanguageModel` before
nnsight 0.8) records into the same `Recording` with `record_transformer_lens(bridge, text, stats)` /
`record_nnsight(lm, text, stats)`.
"""

from headscope.kernels.stats import StatsRequest

from .backend_nnsight import record_nnsight
from .backend_tl import record_transformer_lens
from .edits import LayerEdit
from .errors import (DeviceError, HeadIndexError, InputError, ModelLoadError, PatternMemoryError,
                     RecordingError)
from .loading import EMBEDDED, EMBEDDED_ENCODER, cache_root, load_model
from .meta import ModelMeta
from .model import HeadscopeModel
from .recording import Recording

__all__ = ["load_model", "HeadscopeModel", "Recording", "ModelMeta", "StatsRequest", "LayerEdit", "EMBEDDED",
           "EMBEDDED_ENCODER", "cache_root", "DeviceError", "HeadIndexError", "InputError", "ModelLoadError",
           "PatternMemoryError", "RecordingError", "record_transformer_lens", "record_nnsight"]

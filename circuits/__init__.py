"""headscope.circuits: prompt sets, head detectors, interventions, head ranking, causal validation."""

from .ablation import ablate_heads
from .detectors import DetectorConfig, get_detector, run_detector
from .scores import KINDS, DetectorResult, Validation, head_scores, score_grid, top_heads

__all__ = ["ablate_heads", "DetectorConfig", "get_detector", "run_detector", "KINDS", "DetectorResult",
           "Validation", "head_scores", "score_grid", "top_heads"]

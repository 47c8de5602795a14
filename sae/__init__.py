"""headscope.sae: sparse autoencoders on head outputs (z) or the residual stream.

activations (source + shuffled shard store), architectures (relu, topk, batchtopk, jumprelu),
init (b_dec), train (AdamW, schedules, checkpoints, exact resume), metrics (L0, FVU, CE loss
recovered, dead/dense, top contexts, head attribution), saelens_format (cfg.json +
sae_weights.safetensors + sparsity.safetensors), corpus (user corpora, embedded default).
"""

from .activations import ActivationStore, collect, model_activations
from .architectures import SAE, SAEConfig
from .metrics import ce_loss_recovered, head_attribution, reconstruction_metrics, top_activating
from .saelens_format import load_sae, save_sae
from .train import TrainConfig, new_sae, train

__all__ = ["ActivationStore", "collect", "model_activations", "SAE", "SAEConfig", "ce_loss_recovered",
           "head_attribution", "reconstruction_metrics", "top_activating", "load_sae", "save_sae",
           "TrainConfig", "new_sae", "train"]

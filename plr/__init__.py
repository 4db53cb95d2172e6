"""plr: Parallel Latent Reasoning for sequential recommendation.

``PLRModel`` (Tang et al.) and the SASRec base model on the same backbone
code; the fused kernels live in ``plr_kernels``.
"""

from .models import ModelOutput, PLRModel, SASRecModel, SequentialRecommender

__version__ = "0.1.0"

__all__ = ["ModelOutput", "PLRModel", "SASRecModel", "SequentialRecommender", "__version__"]

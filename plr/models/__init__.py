from .base import ModelOutput, SequentialRecommender
from .plr import PLRModel
from .sasrec import SASRecModel

__all__ = ["ModelOutput", "PLRModel", "SASRecModel", "SequentialRecommender"]

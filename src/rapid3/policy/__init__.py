"""The learned controller: observation features, the three heads, ``RapidPolicy`` (save/load) and
``PolicyConfig``, the knobs a training run chooses for it."""

from .config import PolicyConfig
from .heads import ActionDistribution, Decision
from .rapid_policy import RapidPolicy

__all__ = ["ActionDistribution", "Decision", "PolicyConfig", "RapidPolicy"]

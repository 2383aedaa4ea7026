"""The learned controller: observation features, the three heads, and ``RapidPolicy`` (save/load)."""

from .heads import ActionDistribution, Decision
from .rapid_policy import RapidPolicy

__all__ = ["ActionDistribution", "Decision", "RapidPolicy"]

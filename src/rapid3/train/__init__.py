"""Training RAPID3's policy: GRPO math (``grpo``), rollouts (``rollout``), the discriminator
(``discriminator``), the trainer loop (``trainer``), its config (``config``) and checkpoints
(``checkpoint``). Only the light pieces are imported here; ``from rapid3.train.trainer import train``
for the loop (it loads the embedded pipeline's dependencies)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig

__all__ = ["CheckpointError", "TrainConfig", "load_checkpoint", "save_checkpoint"]

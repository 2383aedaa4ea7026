"""Training RAPID3's policy: GRPO math (``grpo``), rollouts (``rollout``), the discriminator's replay
buffers (``replay``), the trainer loop (``trainer``), its run folder (``run_folder``), its config
(``config``) and the ablations (``ablation``); checkpoints are ``rapid3.common.checkpoint`` (re-exported
here). Only the light pieces are imported here; ``from rapid3.train.trainer import train`` for the loop."""

from ..common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig

__all__ = ["CheckpointError", "TrainConfig", "load_checkpoint", "save_checkpoint"]

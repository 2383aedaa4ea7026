"""Put tests/ on sys.path so test files can import shared helpers (e.g. ``tiny_pipelines``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

# Tiny test models run far faster on one thread than on two contended ones.
torch.set_num_threads(1)

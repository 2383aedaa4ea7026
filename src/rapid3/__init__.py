"""rapid3: learned per-image, per-step acceleration (Step-Skip, Cache-Reuse, Sparse-Attention) for DiTs."""

__version__ = "0.1.0"

"""Utilities every layer may use: atomic checkpoints, stop signals, prompt files. Imports nothing else of rapid3."""

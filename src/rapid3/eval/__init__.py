"""Evaluation: the evaluator network for Fréchet distance (image metrics are ``rapid3.rewards.metrics``), and `rapid3 bench`
(``bench.py``: methods x knobs on the embedded pipeline; ``report.py``, ``plots.py``: its outputs)."""

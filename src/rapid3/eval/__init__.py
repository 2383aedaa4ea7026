"""Evaluation: image metrics, the evaluator network for Fréchet distance, and `rapid3 bench`
(``bench.py``: methods x knobs on the embedded pipeline; ``report.py``, ``plots.py``: its outputs)."""

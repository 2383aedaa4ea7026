"""Utilities every layer may use: atomic checkpoints, stop signals, prompt files, documented config fields
(``knobs``) and programs that run as subcommands and with ``python -m`` (``programs``). Imports nothing else of
rapid3."""

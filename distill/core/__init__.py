"""Training infrastructure shared by every trainer: the engine and trainer kit, configs and recipes, atomic
files and checkpoints, precision, distributed helpers, run logs, image decoding. Imports nothing else of
ssld-kit (tests/test_layers.py holds that)."""

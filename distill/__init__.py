"""ssld-kit distill: produces SSLD students (zoo, stage multipliers, artifact format, losses, trainer)."""

__version__ = "0.1.0"

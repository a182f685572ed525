"""ssld-kit distill: produces SSLD students (zoo, stage multipliers, artifact format, losses, trainer)."""

__version__ = "0.1.0"

from . import paddle_models  # noqa: E402,F401  registers PaddleClas-compatible timm architectures

"""ssld-kit distill: produces SSLD students (zoo, stage multipliers, artifact format, losses, trainer)."""

__version__ = "0.1.0"

# After `import distill`, timm.create_model builds every architecture distill.convert writes (the PaddleClas-
# compatible variants); paddle_models imports only torch and timm.
from distill.students import paddle_models as _paddle_models  # noqa: E402,F401

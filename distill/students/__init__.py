"""The student contract every consumer uses: the model zoo, per-stage multipliers, the student artifact,
matched weight decay, and PaddleClas import and export. Builds on distill.core only.

Importing it registers the PaddleClas-compatible architectures with timm (`paddle_models`).
"""
from distill.students import paddle_models as _paddle_models  # noqa: F401

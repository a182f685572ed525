"""SSLD students in detectron2: one import registers the backbone builders; the MODEL.SSLD config node, the
optimizer with the per-stage multipliers and the matched decay, and a DefaultTrainer that uses it.

    import detection.detectron2 as ssld                      # needs detectron2 (see INSTALL below)
    cfg = get_cfg(); cfg.merge_from_file(".../Base-RCNN-FPN.yaml")
    ssld.add_ssld_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_ssld_fpn_backbone"
    cfg.MODEL.SSLD.STUDENT = "r50_vd_ssld"                   # artifact, zoo name, timm:ARCH, local-dir:FOLDER
    trainer = ssld.SSLDTrainer(cfg)                          # DefaultTrainer + build_ssld_optimizer + COCOEvaluator

`python -m detection.train ... --engine detectron2` runs the kit's detection recipes through it
(detection.detectron2.train).
"""
from __future__ import annotations

from distill.core.errors import UserError

INSTALL = ("detectron2 is not installed: build it from source (pip install "
           "'git+https://github.com/facebookresearch/detectron2.git' --no-build-isolation, see its INSTALL.md)")


def require() -> None:
    """A one-line UserError naming the install command when detectron2 cannot be imported."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


require()

from .backbone import SSLDBackbone, add_ssld_config, build_ssld_backbone, build_ssld_fpn_backbone  # noqa: E402
from .optimizer import build_ssld_optimizer, ssld_param_groups  # noqa: E402
from .trainer import SSLDTrainer  # noqa: E402

__all__ = ["INSTALL", "require", "SSLDBackbone", "add_ssld_config", "build_ssld_backbone", "build_ssld_fpn_backbone",
           "build_ssld_optimizer", "ssld_param_groups", "SSLDTrainer"]

"""detectron2's DefaultTrainer with the SSLD optimizer: what a detectron2 project trains a student detector with."""
from __future__ import annotations

import os

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .optimizer import build_ssld_optimizer


class SSLDTrainer(DefaultTrainer):
    """DefaultTrainer whose optimizer is build_ssld_optimizer (per-stage multipliers, matched decay) and whose
    evaluator is detectron2's COCOEvaluator on each of DATASETS.TEST (results under OUTPUT_DIR/inference)."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_ssld_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))

"""A detectron2 run's final model behind the kit detector's interface, for detection.eval and detection.predict."""
from __future__ import annotations

import json

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .config import base_rcnn_fpn


class Detectron2Detector(torch.nn.Module):
    """RGB float images in [0, 1], (3, H, W), in; per image a dict of boxes (xyxy, input pixels), scores and
    labels 1..K out, as the kit's detector answers. Each image is resized as detectron2's test loader does
    (ResizeShortestEdge on the uint8 pixels), so the detections are the ones its COCOEvaluator scores."""

    def __init__(self, model: torch.nn.Module, cfg: CfgNode):
        super().__init__()
        self.model = model
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        inputs = []
        for image in images:
            height, width = image.shape[-2:]
            pixels = image.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            if self.input_format == "BGR":
                pixels = pixels[:, :, ::-1]
            resized = self.resize.get_transform(pixels).apply_image(pixels)
            inputs.append(dict(image=torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                               height=height, width=width))
        found = [out["instances"] for out in self.model(inputs)]
        return [dict(boxes=i.pred_boxes.tensor, scores=i.scores, labels=i.pred_classes + 1) for i in found]


def load_detector(ckpt: dict, device="cpu") -> Detectron2Detector:
    """The model of a checkpoint written by detection.detectron2.train, built from its config and the student's
    metadata alone (the student file is not needed), in eval mode on `device`."""
    cfg = base_rcnn_fpn()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["detectron2_config"]))
    cfg.MODEL.SSLD.STUDENT_META = json.dumps(ckpt["backbone_meta"])
    cfg.MODEL.DEVICE = str(device)
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return Detectron2Detector(model, cfg).to(device).eval()

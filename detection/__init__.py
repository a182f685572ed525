"""ssld-kit detection: Faster / Cascade R-CNN (FPN) on COCO with student backbones."""

"""`import distill` alone registers every architecture a converted artifact can name (a fresh interpreter,
so no other test's imports help)."""
import subprocess
import sys

from distill.students.convert import PADDLE_ARCHS

PROBE = """
import sys, torch, timm
assert not any(timm.is_model(a) for a in sys.argv[1:] if a.endswith("_paddle")), "registered before import distill"
import distill
assert "distill.students.convert" not in sys.modules
missing = [a for a in sys.argv[1:] if not timm.is_model(a)]
assert not missing, missing
with torch.device("meta"):
    for a in sys.argv[1:]:
        timm.create_model(a, num_classes=3)
print(len(sys.argv) - 1)
"""


def test_import_distill_registers_every_converted_arch_with_timm():
    archs = sorted({a.timm_arch for a in PADDLE_ARCHS.values()})
    assert sum(a.endswith("_paddle") for a in archs) >= 20
    result = subprocess.run([sys.executable, "-c", PROBE, *archs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(len(archs))


def test_paddle_variants_give_timm_feature_maps_for_detection():
    import timm
    import torch

    for arch, channels in [("resnet18d_paddle", [64, 64, 128, 256, 512]),
                           ("mobilenetv3_small_035_paddle", [8, 8, 8, 16, 200]),
                           ("lcnet_025_paddle", [8, 16, 32, 64, 128]),
                           ("hgnetv2_b0_paddle", [64, 256, 512, 1024])]:
        model = timm.create_model(arch, features_only=True).eval()
        with torch.no_grad():
            maps = model(torch.randn(1, 3, 64, 64))
        assert [m.shape[1] for m in maps] == channels == model.feature_info.channels(), arch
        assert [64 // m.shape[-1] for m in maps] == model.feature_info.reduction(), arch

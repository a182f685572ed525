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

"""python -m distill.zoo --bench: params, counted multiply-adds and batch-1 latency per entry, with the machine."""
import pytest
import torch.nn as nn
import torchvision

from distill.students.zoo import create_model
from distill.students.zoo_bench import count_macs
from distill.zoo import main


def test_multiply_adds_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = 8 * 3 * 3 * 3 * 16 * 16       # outputs x (in channels x kernel) per output pixel
    linear = 8 * 16 * 16 * 10
    assert count_macs(net, 16) == conv + linear


@pytest.mark.parametrize("arch, weights", [("resnet18", "ResNet18_Weights"), ("mobilenet_v3_large", "MobileNet_V3_Large_Weights")])
def test_counts_match_what_torchvision_publishes(arch, weights):
    """torchvision ships each model's multiply-adds (its `_ops`, in G, counted by its own tooling)."""
    published = getattr(torchvision.models, weights).DEFAULT.meta["_ops"]
    assert round(count_macs(getattr(torchvision.models, arch)(), 224) / 1e9, 3) == published


def test_bench_prints_the_machine_and_a_row_per_entry(capsys):
    main(["--bench", "--size", "32", "--names", "mv3_small_x0_35", "pplcnet_x0_25", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "32 px, batch 1, 1 thread(s)" in lines[0] and "GMACs" in lines[0]
    assert "torch threads" in lines[1] and "load average" in lines[1]        # the machine line
    assert lines[3] == ("| name | timm arch | params (M) | GMACs | PyTorch ms | ONNX Runtime ms | PyTorch CPU ms "
                        "| ONNX Runtime CPU ms |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[5:7]]
    assert lines[-1].startswith("2 entries in ") and "load average at the end" in lines[-1]
    assert [r[0] for r in rows] == ["mv3_small_x0_35", "pplcnet_x0_25"]
    for name, arch, params, gmacs, *latencies in rows:
        expected = sum(p.numel() for p in create_model(name, num_classes=1000).parameters()) / 1e6
        assert params == f"{expected:.2f}" and float(gmacs) > 0
        assert len(latencies) == 4 and all(float(ms) > 0 for ms in latencies)

"""Shared fixtures: tiny demo data made by the project's own generator (no binary blobs, no network)."""
import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with subprocess tests, spinning
# threads made small models up to 30x slower. Set before torch loads; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tiny models gain nothing from a second one, and tests that start worker
# processes would oversubscribe the 2 CI cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """4 classes x (12 train + 6 val) images at 64 px, ImageFolder + list files + COCO json."""
    from distill.core.demo_data import generate

    root = tmp_path_factory.mktemp("demo")
    generate(root, num_classes=4, train_per_class=12, val_per_class=6, image_size=64, seed=0)
    return root


@pytest.fixture
def ssld_home(tmp_path, monkeypatch):
    """An empty $SSLD_HOME for tests that resolve artifact names."""
    home = tmp_path / "ssld_home"
    home.mkdir()
    monkeypatch.setenv("SSLD_HOME", str(home))
    return home

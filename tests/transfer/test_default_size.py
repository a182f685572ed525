"""Item 7: a backbone with no pretrained resolution (random init) fine-tunes at the data's own size, not at
its architecture's 224 px default; a trained artifact keeps its own; a given size wins. The run says which."""
from transfer import finetune
from transfer.config import DEFAULTS
from transfer.datasets import load_dataset

from distill.core.config import Config, merge
from distill.students.artifact import load_student
from helpers import make_artifact


def cfg(**data):
    return Config.wrap(merge(DEFAULTS, dict(dataset="x", backbone="x", data=data)))


def test_random_init_trains_at_the_data_size_an_artifact_at_its_own_and_a_given_size_wins(demo_root, tmp_path):
    data = load_dataset(f"folder:{demo_root}")          # 64 px scenes
    _, random_init = load_student("timm:test_resnet", num_classes=data.num_classes)
    default = random_init["preprocessing"]["input_size"]   # timm's default for the arch (160 px)
    assert default > 64
    res = finetune.resolve_defaults(cfg(), random_init, data)
    assert (res.image_size, res.test_size) == (64, 72)
    assert "the data's own size: median shorter side 64 px" in res.sources["resolution"]
    assert "random init has no pretrained resolution" in res.sources["resolution"]
    _, trained = load_student(make_artifact(tmp_path / "a.safetensors", num_classes=data.num_classes))
    res = finetune.resolve_defaults(cfg(), trained, data)
    assert (res.image_size, res.test_size) == (32, 48) and "the backbone's preprocessing" in res.sources["resolution"]
    res = finetune.resolve_defaults(cfg(image_size=40), random_init, data)
    assert res.image_size == 40 and "train 40 px (given" in res.sources["resolution"]
    assert finetune.resolve_defaults(cfg(), random_init).image_size == default   # no data given: as before

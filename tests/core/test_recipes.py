"""`-c` values: a file as given, else a recipe name (also the README's `configs/...` spelled outside a
checkout); an unknown name is one line naming the nearest recipes."""
from pathlib import Path

import pytest

from distill.core import recipes
from distill.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_names_resolve_to_the_recipes_and_paths_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # no configs/ here
    configs = ROOT / "configs"
    assert recipes.resolve_recipe("r50") == configs / "r50.yaml"
    assert recipes.resolve_recipe("detection/cascade_mv3_640") == configs / "detection" / "cascade_mv3_640.yaml"
    assert recipes.resolve_recipe("transfer/flowers102.yaml") == configs / "transfer" / "flowers102.yaml"
    assert recipes.resolve_recipe("./configs/detection/demo.yaml") == configs / "detection" / "demo.yaml"
    names = recipes.list_recipes()
    assert {"r50", "mv3", "detection/faster_r50_vd_640", "transfer/flowers102"} <= set(names)
    assert len(names) == len(list(configs.rglob("*.yaml")))
    assert recipes.recipe_title("r50").startswith("SSLD big-data stage")
    listing = recipes.format_recipes().splitlines()
    assert [line.split()[0] for line in listing[:len(names)]] == names
    assert any(line.startswith("detection/cascade_mv3_640 ") and "Cascade R-CNN" in line for line in listing)
    own = tmp_path / "r50"                            # a file of that name wins over the recipe
    own.write_text("x: 1\n")
    assert recipes.resolve_recipe("r50") == Path("r50")


def test_unknown_names_list_the_nearest_recipes_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        recipes.resolve_recipe("cascade_mv3_640")     # the folder forgotten
    assert "did you mean detection/cascade_mv3_640" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="did you mean transfer/flowers102"):
        recipes.resolve_recipe("transfer/flowers")
    with pytest.raises(UserError, match="config file not found: /nowhere/r50.yaml"):
        recipes.resolve_recipe("/nowhere/r50.yaml")   # an absolute path never falls back to a recipe


def test_installed_layout_is_found_without_a_checkout(tmp_path, monkeypatch):
    packaged = tmp_path / "site" / "distill" / "configs"
    (packaged / "transfer").mkdir(parents=True)
    (packaged / "transfer" / "base.yaml").write_text("# base\na: 1\n")
    (packaged / "transfer" / "pets.yaml").write_text("_base_: base.yaml\nb: 2\n")
    monkeypatch.setattr(recipes, "PACKAGED", packaged)
    monkeypatch.setattr(recipes, "CHECKOUT", tmp_path / "site" / "configs")   # no checkout there
    monkeypatch.chdir(tmp_path)
    assert recipes.list_recipes() == ["transfer/base", "transfer/pets"]
    from distill.core.config import load_yaml_with_bases
    assert load_yaml_with_bases(recipes.resolve_recipe("transfer/pets")) == {"a": 1, "b": 2}

"""transfer.finetune, transfer.search and transfer.datasets over bad files and values: one `error:` line,
exit 2, never a traceback (the machinery and the shared tests: tests/bad_inputs.py)."""
from bad_inputs import NO_NETWORK, BadFiles, Row, catalogue_fixture, row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)


def folder_with_empty_class(f: BadFiles) -> str:
    """An ImageFolder (train/ and val/) of three images a class, plus an empty class in train/."""
    folder = f.root / "folder_with_empty_class"
    for split in ("train", "val"):
        for p in sorted((f.demo_root / split).iterdir()):
            (folder / split / p.name).mkdir(parents=True)
            for img in sorted(p.iterdir())[:3]:
                (folder / split / p.name / img.name).write_bytes(img.read_bytes())
    (folder / "train" / "aaa_empty").mkdir()
    return f"folder:{folder}"


def rows(f: BadFiles) -> list[Row]:
    root, demo = f.root, f"folder:{f.demo_root}"
    ft = lambda *a: ["--dataset", demo, "--backbone", "timm:test_resnet", "--device", "cpu",
                     "--out-dir", str(root / "ft"), *a]
    return [
        # transfer.search (fails before any cell trains)
        Row("search-all-without-datasets", "transfer.search",
            ["--all", "--data-root", str(f.empty_dir), "--baseline", "timm:test_resnet", "--distilled",
             "timm:test_resnet", "--out-dir", str(root / "search1"), "--device", "cpu"], "nothing ran"),
        Row("search-grid-malformed", "transfer.search",
            ["--dataset", demo, "--backbone", "timm:test_resnet", "--grid", "lr",
             "--out-dir", str(root / "search2"), "--device", "cpu"], "grid axis 'lr'"),
        Row("search-gpus-negative", "transfer.search",
            ["--dataset", demo, "--backbone", "timm:test_resnet", "--gpus", "-1",
             "--out-dir", str(root / "search3"), "--device", "cpu"], "--gpus"),
        # transfer.datasets
        Row("datasets-unknown-name", "transfer.datasets", ["flowers", "--data-root", str(root)], "flowers"),
        Row("datasets-missing", "transfer.datasets", ["dtd", "--data-root", str(root)], "dtd"),
        Row("datasets-download-offline", "transfer.datasets",
            ["cifar10", "--download", "--data-root", str(root / "dl")], "cifar10", env=NO_NETWORK),
        Row("datasets-missing-folder", "transfer.datasets", [f"folder:{root / 'nope'}"], "nope"),
        Row("datasets-folder-empty-class", "transfer.datasets", [folder_with_empty_class(f)], "aaa_empty"),
        # transfer.finetune
        Row("finetune-workers-negative", "transfer.finetune", ft("--workers", "-2"), "workers"),
        Row("finetune-lr-negative", "transfer.finetune", ft("--lr", "-1"), "lr"),
        Row("finetune-image-size-negative", "transfer.finetune", ft("--image-size", "-5"), "image_size"),
        Row("finetune-label-smoothing", "transfer.finetune", ft("--label-smoothing", "2"), "label"),
        Row("finetune-unknown-dataset", "transfer.finetune",
            ["--dataset", "flowers", "--backbone", "timm:test_resnet", "--out-dir", str(root / "ft2")], "flowers"),
        Row("finetune-malformed-yaml", "transfer.finetune", ["-c", str(f.bad_yaml)], "bad.yaml"),
        Row("finetune-tab-yaml", "transfer.finetune", ["-c", str(f.tab_yaml)], "tab.yaml"),
        Row("finetune-hostile-backbone", "transfer.finetune",
            ["--dataset", demo, "--backbone", str(f.hostile_pt), "--out-dir", str(root / "ft3")], "hostile.pt"),
        Row("finetune-download-offline", "transfer.finetune",
            ["--dataset", "cifar10", "--download", "--backbone", "timm:test_resnet", "--data-root", str(root / "dl2"),
             "--out-dir", str(root / "ft4")], "cifar10", env=NO_NETWORK),
    ]


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)

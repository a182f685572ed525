"""The transfer datasets, read from a local root through torchvision.datasets (Kornblith et al. protocol).

Every dataset gives four splits: `train` and `val` for model selection, `trainval` (their union) for the
final fit, and `test` for the reported number. Official splits are used where they exist (Flowers
train/val/test, DTD split 1, Aircraft variant train/val/test); elsewhere `val` is a stratified held-out
fraction of the official training set, drawn from a seed. Caltech101 has the protocol's 102 classes
(BACKGROUND_Google included, which torchvision drops), takes 30 training images per class (seeded) and
tests on the rest; SUN397 uses partition 1 (Training_01.txt / Testing_01.txt).

    python -m transfer.datasets [NAME ...] [--data-root DIR] [--download]   # found split sizes vs the protocol's
"""
from __future__ import annotations

import os
from pathlib import Path

from distill.core.atomic import OUTPUT_ERRNOS
from distill.core.errors import ArgumentParser, UserError, run_cli

from .splits import TOP1, DatasetNotFound, TransferData, read_image_folder, stratified_split
from .ten_datasets import SPECS, TEN, check_present


def default_data_root() -> Path:
    return Path(os.environ.get("SSLD_DATA", "data")).expanduser()


def dataset_names() -> str:
    return ", ".join(TEN) + ", demo, folder:PATH"


def _demo_root(root: Path) -> Path:
    """The demo downstream task (4 shapes the demo students never saw, 10 labels each) under ROOT/demo,
    generated on first use: it is procedural, not a download."""
    path = root / "demo"
    if not (path / "demo_data.json").is_file():  # written last: its absence means missing or incomplete
        from distill.core.demo_data import PRESETS, format_summary, generate
        print(f"demo data not found in {path}: generating the downstream preset", flush=True)
        print(format_summary(generate(path, **PRESETS["downstream"], overwrite=True)), flush=True)
    return path


def load_dataset(name: str, root=None, download: bool = False, val_fraction: float = 0.2,
                 seed: int = 0) -> TransferData:
    """`name` is one of the ten, `demo`, or `folder:PATH`. Splits are deterministic given `seed`."""
    root = (Path(root).expanduser() if root else default_data_root()).absolute()
    if name == "demo" or name.startswith("folder:"):
        path = _demo_root(root) if name == "demo" else Path(name[len("folder:"):]).expanduser()
        classes, train, val, test = read_image_folder(path)
        root, metric = path, TOP1
    elif name in SPECS:
        spec = SPECS[name]
        check_present(spec, root, download)
        try:
            classes, train, val, test = spec.read(root, download, seed)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFound(f"{spec.title} under {root}: torchvision says {e}. "
                                  f"{spec.obtain.replace('ROOT', str(root))}") from None
        except ImportError as e:  # Flowers102 and StanfordCars read .mat files with scipy; Caltech101's download gdown
            raise UserError(f"{spec.title} needs {e.name or 'scipy'} to read or fetch its files: "
                            f"pip install {e.name or 'scipy'}") from None
        except OSError as e:      # urllib.error.URLError, socket errors: no network, a proxy, a dead mirror
            if not download or getattr(e, "errno", None) in OUTPUT_ERRNOS:
                raise
            reason = getattr(e, "reason", None) or e.strerror or e
            raise DatasetNotFound(f"{spec.title} ({spec.name}): --download failed ({type(e).__name__}: {reason}); "
                                  f"without network, {spec.obtain.replace('ROOT', str(root))}".replace(
                                      "pass --download to let torchvision fetch it, or ", "")) from None
        metric = spec.metric
    else:
        import difflib
        near = difflib.get_close_matches(name, list(SPECS) + ["demo"], n=1)
        raise UserError(f"unknown dataset {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                        + f"; expected one of {dataset_names()}")
    if val is None:
        kept, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held)
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise DatasetNotFound(f"{name} under {root}: a split is empty "
                              f"(train {len(train)}, val {len(val)}, test {len(test)})")
    return TransferData(name, metric, list(classes), train, val, test, root)


def protocol_table(names, root: Path, download: bool = False) -> tuple[list[str], list[str]]:
    """(lines, names not found): per dataset the classes and split sizes found next to the protocol's."""
    lines, missing = [], []
    for name in names:
        spec = SPECS.get(name)
        want = (f"protocol {spec.num_classes} classes, train {spec.protocol[0]}, test {spec.protocol[1]}"
                if spec and spec.protocol else "")
        try:
            d = load_dataset(name, root, download=download)
        except UserError as e:
            missing.append(name)
            lines.append(f"{name:11s} missing{' (' + want + ')' if want else ''}: {e}")
            continue
        s = d.sizes()
        found = (d.num_classes, s["trainval"], s["test"])
        verdict = ("" if not want else "  = protocol" if found == (spec.num_classes, *spec.protocol) else
                   f"  differs from the {want}")
        lines.append(f"{name:11s} {d.num_classes} classes, train {s['trainval']} (fit {s['train']} + val "
                     f"{s['val']}), test {s['test']}, metric {d.metric}{verdict} ({d.root})")
    return lines, missing


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m transfer.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"datasets to check (default: the ten); {dataset_names()}")
    parser.add_argument("--data-root", default=None, help="default $SSLD_DATA or ./data")
    parser.add_argument("--download", action="store_true", help="let torchvision fetch the missing ones (network)")
    args = parser.parse_args(argv)
    root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
    print(f"data root: {root.resolve()}")
    lines, missing = protocol_table(args.names or TEN, root, args.download)
    print("\n".join(lines), flush=True)
    if args.names and missing:   # asked for by name: a script must see that they are not there
        first = next(line for line in lines if line.startswith(f"{missing[0]:11s} missing")).split(": ", 1)[1]
        raise UserError(f"{len(missing)} of {len(args.names)} datasets not found under {root}: {missing[0]}: {first}"
                        + (f" (and {', '.join(missing[1:])}, listed above)" if len(missing) > 1 else ""))


if __name__ == "__main__":
    run_cli(main)

"""python -m distill.convert: PaddleClas .pdparams -> an installed student artifact, or --download NAME.

The conversion itself is distill.students.convert; fetching published files is distill.students.download.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from distill.core.errors import UserError, run_cli
from distill.students import convert, download, published
from distill.students.artifact import save_student, ssld_home


def _output_for(weights: Path, name: str | None, output: str | None) -> Path:
    """-o wins; else $SSLD_HOME/NAME.safetensors, so a bare NAME resolves for every consumer."""
    if output:
        return Path(output)
    return ssld_home() / f"{name or weights.stem}.safetensors"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill.convert", description=convert.__doc__.splitlines()[0],
        epilog="Downloadable: " + ", ".join(published.PUBLISHED)
               + f". ${published.BASE_URL_ENV} points --download at a mirror.")
    parser.add_argument("weights", nargs="?",
                        help="PaddleClas .pdparams file (paddle.save of a legendary_models state dict)")
    parser.add_argument("--download", metavar="NAME",
                        help="fetch PaddleClas's published SSLD weights for NAME (network), convert, install")
    parser.add_argument("--arch", help=f"model the weights belong to: {', '.join(convert.PADDLE_ARCHS)} (or the PaddleClas "
                                       "name); optional for a published file under its own name")
    parser.add_argument("--name", help="student name (default: the published name, else the file's stem)")
    parser.add_argument("-o", "--output", help="artifact to write (default: $SSLD_HOME/NAME.safetensors)")
    parser.add_argument("--num-classes", type=int, help="expected classifier size (default: read from the weights)")
    parser.add_argument("--force", action="store_true", help="with --download: fetch and convert again")
    parser.add_argument("--no-progress", action="store_true", help="no download progress bar")
    args = parser.parse_args(argv)
    if args.download:
        if args.weights or args.arch or args.num_classes:
            raise UserError("--download NAME takes no weights file, --arch or --num-classes: the name fixes them")
        entry = published.get_published(args.download)
        if args.output or args.name:
            raise UserError("--download installs into $SSLD_HOME under its published name; convert a fetched "
                            f"file with -o instead: {published.convert_command(entry)} -o PATH")
        path = download.download_student(args.download, progress=not args.no_progress, force=args.force)
        print(f"installed {path} ({entry.paddle_name}, top-1 {entry.top1:.2f}%); use it as --backbone {entry.name} "
              f"or teacher.models: [{entry.name}]")
        return
    if not args.weights:
        parser.error("give a .pdparams file, or --download NAME")
    weights = Path(args.weights)
    entry = published.published_for_file(weights)
    same_arch = args.arch is None or (entry is not None and convert.get_paddle_arch(args.arch).paddle_name == entry.paddle_name)
    if entry is not None and same_arch and args.num_classes in (None, 1000):
        model, meta = download.convert_published(weights, entry)
        name = args.name or entry.name
    else:
        if not args.arch:
            raise UserError(f"{weights.name} is not a published file name; say which model it is with --arch "
                            f"({', '.join(a.paddle_name for a in convert.PADDLE_ARCHS.values())})")
        model, meta = convert.convert_pdparams(weights, args.arch, args.num_classes)
        name = args.name or weights.stem
    meta["name"] = name
    output = _output_for(weights, name, args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_student(output, model, meta)
    print(f"wrote {output}: {meta['arch']}, {meta['num_classes']} classes, from {weights.name}")


if __name__ == "__main__":
    run_cli(main)

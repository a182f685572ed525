"""python -m distill.zoo: every student name with its timm architecture, stages and multipliers; which
published students are installed or downloadable; --configs lists the recipes; --bench measures params,
multiply-adds and CPU latency (PyTorch, ONNX Runtime) per entry."""
from __future__ import annotations

from distill.core.errors import ArgumentParser, number_in, run_cli
from distill.core.recipes import format_recipes
from distill.students import zoo
from distill.students.download import status_lines


def main(argv=None):
    parser = ArgumentParser(prog="python -m distill.zoo", description=zoo.__doc__.splitlines()[0])
    parser.add_argument("--configs", action="store_true", help="list the recipes -c accepts")
    parser.add_argument("--bench", action="store_true",
                        help="params, GMACs and batch-1 CPU latency (PyTorch, ONNX Runtime) per entry")
    parser.add_argument("--size", type=number_in(int, 32), default=224, help="--bench input resolution (default 224)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="--bench only these entries (default: the whole zoo)")
    parser.add_argument("--threads", type=number_in(int, 1), help="--bench torch and onnxruntime threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.configs:
        print(format_recipes())
        return
    if args.bench:
        from distill.students.zoo_bench import run_bench  # onnx, onnxruntime: only when benching
        run_bench(args.names or list(zoo.ZOO), args.size, args.threads, say=lambda line: print(line, flush=True))
        return
    rows = zoo.zoo_table()
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    print("\nAny timm model: timm:NAME (stages from timm's group_matcher, multipliers 1.0)")
    print("\n" + "\n".join(status_lines()))


if __name__ == "__main__":
    run_cli(main)

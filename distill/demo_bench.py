"""The demo chain over several seeds: mean and spread of every gap it claims.

    python -m distill.demo_bench runs/demo_bench [--seeds 0,1,2] [--scale demo]

Each seed is a whole `python -m distill.demo OUT/seed<N> --seed N` (new data, new initialisation), resumable
like the demo itself. A gap whose range over the seeds reaches zero or below is reported as not shown: the
claim is only as good as its worst seed. Writes OUT/bench.json and OUT/bench.md (with the machine line).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from distill.core.atomic import atomic_write
from distill.core.benchmark import machine_line
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill import demo

# Gaps whose claim is a loss, not a gain (reduced multipliers should hurt a random init).
EXPECTED_NEGATIVE = {"transfer: reduced - uniform, random init"}


def aggregate(runs: dict[int, dict]) -> dict:
    """{gap: {values, mean, std, min, max, shown}} over the seeds' summaries."""
    names = list(next(iter(runs.values()))["gaps"])
    out = {}
    for name in names:
        values = [runs[s]["gaps"][name] for s in sorted(runs)]
        sign = -1 if name in EXPECTED_NEGATIVE else 1
        out[name] = dict(values=values, mean=statistics.fmean(values),
                         std=statistics.stdev(values) if len(values) > 1 else 0.0, min=min(values), max=max(values),
                         shown=all(sign * v > 0 for v in values))
    return out


def format_markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; {result['machine_start']} at the start, load average "
             f"{result['load_end']} at the end; chain time per seed (the sum of its steps): "
             + ", ".join(f"{s:.0f} s" for s in result["seconds"]) + ".", "",
             "| gap (points) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | shown on every seed |",
             "|---|" + "---:|" * (len(seeds) + 2) + "---|"]
    for name, g in result["gaps"].items():
        verdict = "yes" if g["shown"] else ("no: the spread crosses zero" if g["min"] < 0 < g["max"]
                                            else "no: the wrong sign")
        if name in EXPECTED_NEGATIVE:
            verdict += " (expected < 0)"
        lines.append(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in g["values"])
                     + f" | {g['mean']:+.2f} | {g['std']:.2f} | {verdict} |")
    lines += ["", "Absolute numbers (mean over seeds):", "",
              "| result | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for label, values in result["absolute"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.fmean(values):.2f} |")
    return "\n".join(lines) + "\n"


def absolute(runs: dict[int, dict]) -> dict:
    seeds = sorted(runs)
    rows = {}
    for key, title in demo.CLASSIFICATION_ROWS:
        rows[f"top-1: {title}"] = [runs[s]["classification"][key]["top1"] for s in seeds]
    for b, title in demo.BACKBONES:
        for m in demo.MULTIPLIERS:
            rows[f"transfer top-1: {title}, {m}"] = [runs[s]["transfer"][f"{b}/{m}"]["top1"] for s in seeds]
    for b, title in demo.BACKBONES:
        rows[f"detection AP: {title}"] = [runs[s]["detection"][b]["AP"] for s in seeds]
    rows["mined images off-topic (%)"] = [runs[s]["mining"]["off_topic_in_mined"] for s in seeds]
    return rows


def main(argv=None):
    p = ArgumentParser(prog="python -m distill.demo_bench", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder: one demo per seed under OUT/seed<N>, then bench.json and bench.md")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--scale", choices=sorted(demo.SCALES), default="demo")
    p.add_argument("--force", action="store_true", help="redo every seed's chain")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {args.seeds!r}: give at least two distinct seeds >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine_start = machine_line()
    runs, seconds = {}, []
    for seed in seeds:
        runs[seed] = demo.main([str(out / f"seed{seed}"), "--seed", str(seed), "--scale", args.scale, "--quiet",
                                *(["--force"] if args.force else [])])
        seconds.append(runs[seed]["chain_seconds"])   # every step's time, also of steps an earlier run did
    result = dict(seeds=seeds, scale=args.scale, machine_start=machine_start,
                  load_end=", ".join(f"{v:.1f}" for v in os.getloadavg()), seconds=seconds,
                  gaps=aggregate(runs), absolute=absolute(runs))
    atomic_write(out / "bench.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(format_markdown(result)))
    print(format_markdown(result))
    return result


if __name__ == "__main__":
    run_cli(main)

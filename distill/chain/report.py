"""The chain's report: OUT/report.md, OUT/report.png and OUT/summary.json, teacher, baseline and SSLD student
side by side.

Every number is read back from where the chain's steps left it, and the report names the place: the
accuracies from the artifacts' metadata (distill.ssld's `pretrain.top1`, transfer.finetune's `transfer.score`)
and the Fix runs' results.json, the mining figures from dedup's and mining's summaries, size, speed, mean
per-class accuracy and the confusion matrix from the report step's measurements.json. So the report says
what the files say, and a reader can check any figure against its file.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from distill.chain.defaults import Setting
from distill.core.atomic import atomic_write
from distill.students.artifact import read_meta

ROLES = (("teacher", "teacher"), ("baseline", "student, labels only"), ("ssld", "SSLD student"))
MAX_MATRIX_CLASSES = 15     # larger confusion matrices go to the picture only; the markdown lists the worst pairs


def _read(path) -> dict:
    return json.loads(Path(path).read_text())


def accuracy_rows(s: dict) -> dict:
    """{role: {arch, top1, top1_test, top1_fix, sizes, sources}} from the artifacts and results files."""
    rows, measured = {}, s["measured"]["models"]
    for role, _ in ROLES:
        path = s["models"][role]
        meta = read_meta(path)
        prep = meta["preprocessing"]
        row = dict(arch=meta["arch"], artifact=path, top1_fix_train=None, train_size=int(prep["input_size"]),
                   test_size=int(prep["test_input_size"]), mean_per_class=measured[role]["evaluated"]["mean_per_class"])
        if role == "teacher" and "transfer" in meta:
            t = meta["transfer"]
            row.update(top1=t["score"], top1_test=t["score_test_size"], top1_fix=None,
                       source=f"{path} metadata transfer.score / score_test_size (transfer.finetune on DATA)")
        elif role == "teacher":   # used as given: what it recorded was measured on its own val set, not DATA's
            row.update(top1=measured[role]["evaluated"]["top1"], top1_test=None, top1_fix=None,
                       source=f"evaluated by the chain on val at {row['train_size']} px (report/measurements.json; "
                              "the teacher was used as given)")
        else:
            p = meta["pretrain"]
            row.update(top1=p["top1"], top1_test=p["top1_test_res"], top1_fix=None,
                       source=f"{path} metadata pretrain.top1 / top1_test_res (distill.ssld)")
        if role in s["fix"]:
            fix = _read(s["fix"][role])["fix"]
            row.update(top1_fix_train=fix["score"], top1_fix=fix["score_test_size"],
                       source=row["source"] + f"; after Fix: {s['fix'][role]} fix.score / fix.score_test_size")
        rows[role] = row
    return rows


def mining_figures(s: dict) -> dict | None:
    if not s["mined"]:
        return None
    folder = Path(s["mined"])
    dedup, mined = _read(folder / "pool_kept_summary.json"), _read(folder / "mined_summary.json")
    counts = {r["name"]: r["count"] for r in mined["per_class"]}
    kept = dedup["kept"] if dedup["kept"] is not None else dedup["pool_images"] - dedup["removed"]  # shards: no list
    return dict(pool=dedup["pool_images"] + dedup["skipped"], unreadable=dedup["skipped"], removed=dedup["removed"],
                kept=kept, k=mined["k"], lines=mined["lines"], unique=mined["unique_images"],
                per_class=counts, sources=f"{folder / 'pool_kept_summary.json'}, {folder / 'mined_summary.json'}")


def collect(s: dict) -> dict:
    """The report's numbers with their sources: what summary.json holds and report.md / .png show."""
    exported = read_meta(Path(s["exported"]) / "model.safetensors")
    return dict(accuracy=accuracy_rows(s), mining=mining_figures(s), exported=dict(
        folder=s["exported"], onnx=(Path(s["exported"]) / "model.onnx").is_file(), **exported["chain"]),
        speed={role: s["measured"]["models"][role]["speed"] for role, _ in ROLES},
        confusion=s["measured"]["models"]["exported"]["evaluated"], machine=s["measured"]["machine"])


# ---------------------------------------------------------------------------------------------------
# Markdown.

def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(header, rows, text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` left-aligned, the numbers after them right-aligned."""
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def accuracy_table(r: dict, plan: dict) -> list[str]:
    a = r["accuracy"]
    size, test = a["baseline"]["train_size"], a["baseline"]["test_size"]
    unbalanced = plan["unbalanced"]
    header = ["model", "arch", f"top-1 at {size} px", f"at {test} px", f"after Fix, at {size} px", f"at {test} px"]
    header += ["mean per-class"] if unbalanced else []
    rows = [[title, a[role]["arch"], *(_pct(a[role][k]) for k in ("top1", "top1_test", "top1_fix_train", "top1_fix"))]
            + ([_pct(a[role]["mean_per_class"])] if unbalanced else []) for role, title in ROLES]
    return _table(header, rows, text_columns=2)


def resolution_note(r: dict) -> list[str]:
    """A line when neither the test resolution nor Fix helped the students, which happens on small images:
    at 32 px a five-stage network's last feature map is 1x1, and any larger input makes it 2x2."""
    a = r["accuracy"]
    worse = all((a[k]["top1_test"] or 0.0) < a[k]["top1"] and (a[k]["top1_fix"] or 0.0) < a[k]["top1"]
                for k in ("baseline", "ssld"))
    if not worse:
        return []
    size, test = a["ssld"]["train_size"], a["ssld"]["test_size"]
    cells = [-(-px // 32) for px in (size, test)]   # a stride-32 network's last feature map, per side
    return [f"The {test} px test resolution lowered both students' top-1, before and after Fix: the last feature "
            f"map grows from {cells[0]}x{cells[0]} at {size} px to {cells[1]}x{cells[1]}, which matters most on small "
            "images; the export serves at the resolution that measured best.", ""]


def speed_table(r: dict) -> list[str]:
    sp = r["speed"]
    header = ["model", "params (M)", "GMACs", "PyTorch batch 1 (ms)", "PyTorch batch 32 (img/s)",
              "ONNX Runtime batch 1 (ms)", "ONNX Runtime batch 32 (img/s)"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [[title, f(sp[role]["params_m"], ".2f"), f(sp[role]["gmacs"], ".4f"), f(sp[role]["torch_ms"], ".2f"),
             f(sp[role]["torch_img_s"], ".0f"), f(sp[role].get("onnx_ms"), ".2f"), f(sp[role].get("onnx_img_s"), ".0f")]
            for role, title in ROLES]
    return _table(header, rows)


def mining_lines(r: dict, plan: dict) -> list[str]:
    m = r["mining"]
    if m is None:
        return ["No unlabeled pool (--unlabeled): the SSLD student distilled on the train images alone, their "
                "labels unused.", ""]
    counts = list(m["per_class"].values())
    lines = [f"Pool {m['pool']} images ({m['unreadable']} unreadable, skipped); dedup removed {m['removed']} "
             f"near-copies of val images, kept {m['kept']}; the teacher's top {m['k']} per class: {m['lines']} lines, "
             f"{m['unique']} distinct images; per class min {min(counts)}, median {statistics.median(counts):g}, "
             f"max {max(counts)}.", ""]
    if len(counts) <= 50:
        lines += ["Mined per class: " + ", ".join(f"{c} {n}" for c, n in m["per_class"].items()) + ".", ""]
    return lines


def confusion_lines(r: dict, classes: list[str]) -> list[str]:
    c = r["confusion"]
    lines = [f"**Confusion matrix of the exported SSLD student** (val at {c['size']} px, {c['images']} images; "
             f"rows: true class, columns: predicted; top-1 {c['top1']:.2f}, mean per-class {c['mean_per_class']:.2f})", ""]
    if len(classes) <= MAX_MATRIX_CLASSES:
        return lines + _table(["true \\ predicted", *classes], [[name, *row] for name, row in zip(classes, c["matrix"])])
    pairs = sorted(((n, classes[i], classes[j]) for i, row in enumerate(c["matrix"]) for j, n in enumerate(row)
                    if i != j and n), reverse=True)[:10]
    return lines + _table(["true", "predicted as", "images"], [[t, p, n] for n, t, p in pairs])


def sources_lines(r: dict, s: dict) -> list[str]:
    a = r["accuracy"]
    rows = [[f"top-1, {title}", a[role]["source"]] for role, title in ROLES]
    rows.append(["mean per-class, confusion matrix", f"{s['plan']['view']}/val evaluated in the report step "
                 "(report/measurements.json)"])
    rows.append(["params, GMACs, latency, throughput", "measured in the report step at each model's train "
                 "resolution (report/measurements.json): torch flop counter (multiply-adds), median wall time "
                 "after warm-up, PyTorch eval / inference mode and ONNX Runtime CPU"])
    if r["mining"]:
        rows.append(["mining figures", r["mining"]["sources"]])
    rows.append(["exported student", f"{r['exported']['folder']}/model.safetensors metadata chain.*"])
    return ["**Where each number came from**", "", *_table(["number", "source"], rows, text_columns=2)]


def format_markdown(s: dict, r: dict) -> str:
    plan = s["plan"]
    e = r["exported"]
    text = [f"# SSLD chain report: {plan['data']}", "",
            f"{len(plan['classes'])} classes; train {sum(plan['train_counts'].values())} images, val "
            f"{sum(plan['val_counts'].values())} ({plan['split']}). Teacher {plan['teacher']}: "
            f"{'fine-tuned on DATA' if plan['finetune_teacher'] else 'used as given'} ({plan['teacher_why']}). "
            f"Student {plan['student']}: the baseline and the SSLD student start from the same init "
            f"(seed {plan['seed']}) and train the same number of steps. The steps took {s['chain_seconds']:.0f} s.", "",
            "**Accuracy on val (%)**", "", *accuracy_table(r, plan), *resolution_note(r),
            f"Exported: {e['folder']} (SSLD student at {e['serving_size']} px, {e['why']}); "
            + ("model.onnx passed its onnxruntime check." if e["onnx"] else "no model.onnx (--no-onnx or onnx not installed)."),
            "", f"**Size and CPU speed** ({r['machine']})", "", *speed_table(r),
            "**Mining**", "", *mining_lines(r, plan), *confusion_lines(r, plan["classes"]), *sources_lines(r, s),
            "**Settings** (name value (why; the flag that overrides it))", "",
            *(f"- {Setting(**v).line(k)}" for k, v in plan["settings"].items()), "",
            "Steps: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in s["steps"].items()), ""]
    return "\n".join(text)


def terminal_summary(s: dict) -> str:
    """What the console shows at the end: the accuracy table and where the exported student went."""
    r, e = s["report"], s["report"]["exported"]
    return "\n".join(["val top-1 (%):", *accuracy_table(r, s["plan"]),
                      f"exported: {e['folder']} (SSLD student at {e['serving_size']} px"
                      + (", model.onnx checked)" if e["onnx"] else ")")])


# ---------------------------------------------------------------------------------------------------
# Picture.

def plot_report(s: dict, r: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colours = {"teacher": "#7f7f7f", "baseline": "#4c72b0", "ssld": "#c44e52"}
    a, sp = r["accuracy"], r["speed"]
    ax = axes[0][0]
    keys = ("top1", "top1_test", "top1_fix_train", "top1_fix")
    for i, (role, title) in enumerate(ROLES):
        values = [a[role][k] for k in keys]
        bars = ax.bar([x + (i - 1) * 0.26 for x in range(len(keys))], [v or 0.0 for v in values], 0.26,
                      color=colours[role], label=title)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(keys)), ["train size", "test size", "after Fix,\ntrain size", "after Fix,\ntest size"])
    ax.set_title("val top-1 (%)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    kinds = [("torch_ms", "PyTorch"), ("onnx_ms", "ONNX Runtime")]
    for i, (role, title) in enumerate(ROLES):
        values = [sp[role].get(k) or 0.0 for k, _ in kinds]
        bars = ax.bar([x + (i - 1) * 0.26 for x in range(2)], values, 0.26, color=colours[role], label=title)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(range(2), [t for _, t in kinds])
    ax.set_title("CPU latency, batch 1 (ms)")
    ax = axes[1][0]
    c, classes = r["confusion"], s["plan"]["classes"]
    ax.imshow(c["matrix"], cmap="Blues")
    ticks = range(len(classes)) if len(classes) <= 30 else []
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"exported SSLD student, val at {c['size']} px")
    ax = axes[1][1]
    if r["mining"]:
        names, counts = zip(*r["mining"]["per_class"].items())
        ax.bar(range(len(names)), counts, color=colours["ssld"])
        ax.set_xticks(range(len(names)) if len(names) <= 30 else [],
                      names if len(names) <= 30 else [], rotation=90, fontsize=7)
        ax.set_title(f"mined per class (k={r['mining']['k']}; pool {r['mining']['pool']})")
    else:
        ax.text(0.5, 0.5, "no unlabeled pool", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"SSLD chain: {s['plan']['data']}", fontsize=12)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def write_report(out: Path, s: dict) -> dict:
    r = collect(s)
    s["report"] = r
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(s, indent=1)))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(format_markdown(s, r)))
    plot_report(s, r, out / "report.png")
    return s

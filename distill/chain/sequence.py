"""The order of `distill.chain`'s steps and the command line each one runs, from the plan (distill/chain/__main__.py).

Each function here turns the plan into one step's trainer arguments; `run_steps` calls them in order and
collects what the report reads: artifact paths and result files, never numbers copied by hand.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from distill.chain import steps
from distill.chain.measure import measure_step
from distill.chain.runner import StepRunner
from distill.core.errors import UserError
from distill.students.artifact import load_student, read_meta, save_student
from distill.students.export import export_folder
from distill.students.onnx_export import OnnxParityError
from transfer.finetune import crop_scale_for


def common_transfer(plan) -> list[str]:
    a = plan.args
    return ["--dataset", f"folder:{plan.data.root}", "--batch-size", str(plan.value("batch_size")),
            "--seed", str(a.seed), "--workers", str(plan.workers), "--device", a.device,
            *(["--no-progress"] if a.quiet else [])]


def eval_every(epochs: int) -> int:
    """About ten evaluations per run (and always one at the end): many short epochs would otherwise spend
    more time on val than on training."""
    return max(1, epochs // 10)


def passthrough(plan, *names) -> list[str]:
    return [a for name in names for item in plan.passthrough[name] for a in ("-o", item)]


def teacher_step(plan, runner: StepRunner) -> str:
    """The teacher the students learn from: T fine-tuned on DATA (transfer.finetune), or T as given."""
    a, folder = plan.args, plan.out / "teacher"
    if not plan.finetune_teacher:
        runner.note("teacher", "used as given", plan.teacher_why)
        return str(a.teacher)
    source = a.teacher
    if steps.is_architecture(a.teacher):   # seeded, with DATA's classifier: the step's own init, resumable
        source = steps.materialize_step(
            runner, "teacher:init", a.teacher, folder / "init", pretrained=a.pretrained, classes=plan.data.classes,
            classes_source=plan.data.train, size=plan.value("image_size"), test_size=plan.value("test_size"),
            seed=a.seed)
    b = plan.value("batch_size")
    argv = [*common_transfer(plan), "--backbone", str(source), "--epochs", str(plan.value("teacher_epochs")),
            "--image-size", str(plan.value("image_size")), "--test-size", str(plan.value("test_size")),
            "--lr", str(plan.value("teacher_lr")), "-o", f"optim.base_batch={b}",
            "-o", f"eval.every_epochs={eval_every(plan.value('teacher_epochs'))}", *passthrough(plan, "teacher")]
    steps.finetune_step(runner, "teacher", folder / "run", argv, outputs=("results.json", "model.safetensors"))
    return str(folder / "run" / "model.safetensors")


def student_values(plan, init: Path, name: str) -> list[str]:
    """The -o values both students share (configs/chain_student.yaml has the rest); the crop range is the
    one transfer.finetune gave the teacher at this size."""
    a, size, b = plan.args, plan.value("image_size"), plan.value("batch_size")
    prep = read_meta(init)["preprocessing"]
    js = json.dumps
    return [f"data.val={js(dict(type='folder', path=str(plan.data.val)))}", f"data.class_names={js(plan.data.classes)}",
            f"student.init={js(str(init))}", f"data.batch_size={b}", f"data.input_size={size}",
            f"data.test_input_size={plan.value('test_size')}", f"data.crop_scale={js(list(crop_scale_for(size)))}",
            f"data.mean={js(prep['mean'])}", f"data.std={js(prep['std'])}", f"data.epoch_samples={plan.data.n_train}",
            f"optim.lr={plan.value('lr')}", f"optim.base_batch={b}", f"schedule.epochs={plan.value('epochs')}",
            f"eval.every_epochs={eval_every(plan.value('epochs'))}",
            f"run.seed={a.seed}", f"run.workers={plan.workers}", f"run.device={a.device}",
            f"run.progress={js(not a.quiet)}", f"export.name={name}"]


def train_source(plan) -> dict:
    return dict(type="folder", path=str(plan.data.train))


def teacher_size(teacher: str) -> int | None:
    try:
        return int(read_meta(teacher)["preprocessing"]["input_size"])
    except UserError:
        return None   # a timm: teacher has no artifact; it sees the students' pixels


def run_steps(plan, runner: StepRunner) -> dict:
    """Every step after `data`, in order (runner.reached raises Until after the one --until names); returns
    the paths the report reads, the report step's measurements and the steps' status."""
    a, out = plan.args, plan.out
    teacher = teacher_step(plan, runner)
    runner.reached("teacher")
    init = steps.materialize_step(runner, "init", a.student, out / "init", pretrained=a.pretrained,
                                  classes=plan.data.classes, classes_source=plan.data.train,
                                  size=plan.value("image_size"), test_size=plan.value("test_size"), seed=a.seed + 1)
    runner.reached("init")
    js = json.dumps
    baseline = steps.student_step(
        runner, "baseline", out / "baseline", "chain_student", "baseline",
        [*student_values(plan, init, "baseline"), f"data.train={js([train_source(plan)])}", "loss.kind=ce",
         "teacher=null", *plan.passthrough["students"], *plan.passthrough["baseline"]])
    runner.reached("baseline")
    mined = None
    if a.unlabeled:
        dedup = [*plan.value("dedup"), *steps_flags(plan, "dedup")]
        mined = steps.mining_step(
            runner, "mining", out / "mined", teacher=teacher, pool=a.unlabeled, against=plan.data.val,
            merge_with=plan.data.train, k=plan.value("k"), class_names=out / "classes.txt", dedup_args=dedup,
            mine_args=steps_flags(plan, "mine"), workers=plan.workers, device=a.device, wds=plan.pool_kind == "wds")
    else:
        runner.note("mining", "nothing to mine", "no --unlabeled")
    runner.reached("mining")
    sources = mined.train_sources(train_source(plan)) if mined else [train_source(plan)]
    size, t_size = plan.value("image_size"), teacher_size(teacher)
    ssld = steps.student_step(
        runner, "ssld", out / "ssld", "chain_student", "ssld_student",
        [*student_values(plan, init, "ssld_student"), f"data.train={js(sources)}", "loss.kind=ssld",
         f"teacher.models={js([teacher])}", *([f"teacher.input_size={t_size}"] if t_size and t_size != size else []),
         *plan.passthrough["students"], *plan.passthrough["ssld"]])
    runner.reached("ssld")
    fix = {}
    for label, artifact in (("baseline", baseline), ("ssld", ssld)):
        argv = [*common_transfer(plan), "--backbone", str(artifact), "--epochs", "0", "--fix",
                "--fix-epochs", str(plan.value("fix_epochs")), *passthrough(plan, "fix")]
        fix[label] = steps.finetune_step(runner, f"fix:{label}", out / "fix" / label, argv,
                                         outputs=("results.json", "model_fix.safetensors"))
    runner.reached("fix")
    exported = export_step(plan, runner, ssld, fix["ssld"])
    runner.reached("export")
    models = dict(teacher=teacher, baseline=str(baseline), ssld=str(ssld))
    measured = measure_step(plan, runner, models, exported)
    return dict(plan=json.loads((out / "plan.json").read_text()), teacher=teacher, models=models,
                fix={k: str(out / "fix" / k / "results.json") for k in fix}, mined=str(mined.folder) if mined else None,
                exported=str(exported), measured=measured, steps=runner.status, chain_seconds=runner.seconds())


def steps_flags(plan, name: str) -> list[str]:
    """-o dedup.cos=0.9 -> ['--cos', '0.9']: the mining CLIs take flags."""
    return [a for pair in plan.passthrough[name]
            for a in ("--" + pair.split("=", 1)[0].replace("_", "-"), pair.split("=", 1)[1])]


# ---------------------------------------------------------------------------------------------------
# Export.

def serving_choice(ssld_meta: dict, fix_results: dict) -> tuple[str, int, float, str]:
    """(which artifact, resolution, val top-1, why): the SSLD student where it measured best on val, the
    same rule for every candidate (as trained or after Fix, each at the train and the test size)."""
    p = ssld_meta["pretrain"]
    prep = ssld_meta["preprocessing"]
    fix = fix_results["fix"]
    candidates = [("trained", int(prep["input_size"]), p["top1"]),
                  ("trained", int(prep["test_input_size"]), p["top1_test_res"]),
                  ("fix", int(fix_results["train_size"]), fix["score"]),
                  ("fix", int(fix_results["test_size"]), fix["score_test_size"])]
    kind, size, top1 = max(candidates, key=lambda c: (c[2] if c[2] is not None else -1.0))
    shown = ", ".join(f"{'after Fix' if k == 'fix' else 'as trained'} at {s} px {t:.2f}" for k, s, t in candidates)
    return kind, size, top1, f"the best val top-1 of: {shown}"


def export_step(plan, runner: StepRunner, ssld: Path, fix_results: dict) -> Path:
    """OUT/export/ssld_student: the chosen SSLD student whose preprocessing serves at its best resolution,
    as a timm / Hugging Face folder with model.onnx (kept only if onnxruntime matches PyTorch)."""
    folder = plan.out / "export" / "ssld_student"
    kind, size, top1, why = serving_choice(read_meta(ssld), fix_results)
    source = ssld if kind == "trained" else Path(fix_results["fix_artifact"])
    onnx = not plan.args.no_onnx and steps.onnx_available()

    def run():
        model, meta = load_student(source)
        meta = dict(meta, name="ssld_student", chain=dict(source=str(source), serving_size=size, val_top1=top1,
                                                           why=why))
        meta["preprocessing"] = dict(meta["preprocessing"], test_input_size=size)
        with tempfile.TemporaryDirectory(dir=plan.out) as tmp:
            chosen = save_student(Path(tmp) / "ssld_student.safetensors", model, meta)
            try:
                export_folder(chosen, folder, onnx=onnx, check_images=[str(plan.data.val)], say=runner.say)
            except OnnxParityError as e:
                shutil.rmtree(folder, ignore_errors=True)
                raise UserError(f"export: {e}. The students and their artifacts are kept; rerun with --no-onnx to "
                                "export the folder without model.onnx") from None

    runner.step("export", [folder / "config.json"], run, folders=[folder])
    return folder

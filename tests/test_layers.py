"""The layers hold: distill.core imports nothing else of the project; transfer/ and detection/ import only
distill.core and distill.students; no import cycle anywhere (function-level imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "transfer", "detection")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (a package import counts as its __init__)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_helper_sees_real_imports():
    g = graph()
    assert "distill.core.errors" in g["distill.core.config"]
    assert "distill.students.artifact" in g["detection.train"]
    assert "distill.core.engine" in g["transfer.finetune"]


def test_core_imports_nothing_else_of_the_project():
    bad = {m: sorted(d for d in deps if not d.startswith("distill.core") and d != "distill")
           for m, deps in graph().items() if m.startswith("distill.core")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_students_build_only_on_core():
    bad = {m: sorted(d for d in deps if not d.startswith(("distill.core", "distill.students")) and d != "distill")
           for m, deps in graph().items() if m.startswith("distill.students")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_transfer_and_detection_import_only_core_and_students():
    allowed = ("distill.core", "distill.students", "transfer", "detection")
    bad = {m: sorted(d for d in deps if not d.startswith(allowed) and d != "distill")
           for m, deps in graph().items() if m.startswith(("transfer", "detection"))}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_import_cycles():
    g = graph()
    # a package's __init__ that re-exports its own modules is not a cycle with them
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in g)} for m, deps in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, cycles

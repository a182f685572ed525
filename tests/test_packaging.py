"""CI must run exactly the test command README.md shows a new user."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = lines.index("<!-- test -->")
    assert lines[marker + 1].startswith("```")
    return lines[marker + 2].strip()


def test_ci_runs_the_readme_test_command():
    command = readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    commands = [line for line in ci_lines if line and not line.startswith("#")]
    assert commands[-1] == command          # what CI runs last is README's command (after the optional detectron2 wheel)
    assert "pytest" in command and "python3 -m venv" in command


def test_readme_opens_with_the_demo_command():
    first_block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
    assert first_block.endswith("python -m distill.demo runs/demo")

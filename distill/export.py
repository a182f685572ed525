"""python -m distill.export: the command-line entry of distill.students.export."""
from distill.core.errors import run_cli
from distill.students.export import main

if __name__ == "__main__":
    run_cli(main)

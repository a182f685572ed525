"""python -m distill.convert: the command-line entry of distill.students.convert."""
from distill.core.errors import run_cli
from distill.students.convert import main

if __name__ == "__main__":
    run_cli(main)

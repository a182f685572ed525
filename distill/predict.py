"""python -m distill.predict: the command-line entry of distill.students.predict."""
from distill.core.errors import run_cli
from distill.students.predict import main

if __name__ == "__main__":
    run_cli(main)

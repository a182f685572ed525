"""python -m distill.zoo: the command-line entry of distill.students.zoo."""
from distill.core.errors import run_cli
from distill.students.zoo import main

if __name__ == "__main__":
    run_cli(main)

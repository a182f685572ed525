"""python -m distill.demo_data: the command-line entry of distill.core.demo_data (the demo-scene generator)."""
from distill.core.demo_data import main
from distill.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)

"""User-facing errors: one exception type that every CLI turns into a one-line message, no traceback."""
from __future__ import annotations

import argparse
import math
import os
import sys

from distill.core.atomic import OutputError, is_torch_write_failure, refused_errno

INTACT = "files written before this one are intact; free space, fix the permissions or choose another output folder, then rerun"


class UserError(Exception):
    """Bad input from a person (a path, a name, a config value). The message says what and where."""


def output_error_message(e: BaseException) -> str | None:
    """One line for a write the file system refused (read-only or full output folder), else None."""
    if isinstance(e, OutputError):
        return f"{e} ({INTACT})"
    code = refused_errno(e)
    if code is not None:
        filename = getattr(e, "filename", None)
        if isinstance(filename, bytes):   # TensorBoard's writer names its files in bytes
            filename = os.fsdecode(filename)
        where = f"cannot write {filename}" if filename else "cannot write the output"
        return f"{where}: {os.strerror(code).lower()} ({INTACT})"
    if is_torch_write_failure(e):
        return f"a checkpoint write was cut short (torch: {str(e).splitlines()[0]}): the disk or quota is " \
               f"probably full ({INTACT})"
    return None


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point; a UserError or a refused write becomes `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:   # only refused writes are turned into a line; anything else is a bug: raise
        message = output_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other error: one `error: ...` line (exit 2 under
    run_cli) naming the flag, instead of a screenful of usage."""

    def error(self, message):
        raise UserError(f"{message} ({self.prog} --help lists the flags)")


def number_in(kind=int, low=None, high=None, low_open: bool = False):
    """argparse `type=`: a number within [low, high] (`low_open`: low itself excluded), so a bad flag
    fails at parse time naming the flag and the allowed range (argparse prefixes the flag)."""
    if low is not None and high is not None:
        allowed = f"in ({low}, {high}]" if low_open else f"in [{low}, {high}]"
    elif low is not None:
        allowed = f"> {low}" if low_open else f">= {low}"
    else:
        allowed = f"<= {high}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {allowed}, got {text!r}") from None
        if kind is float and not math.isfinite(value) or \
                low is not None and (value <= low if low_open else value < low) or \
                high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected {noun} {allowed}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {allowed}"
    return parse

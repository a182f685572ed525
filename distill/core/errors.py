"""User-facing errors: one exception type that every CLI turns into a one-line message, no traceback."""
import sys


class UserError(Exception):
    """Bad input from a person (a path, a name, a config value). The message says what and where."""


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

"""`python -m vmambax ...` is the `vmambax` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())  # the exit status of a failed command reaches the shell

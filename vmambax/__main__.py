"""`python -m vmambax ...` is the `vmambax` command."""
from .cli import main

if __name__ == "__main__":
    main()

"""`python -m dho ...` is the `dho` command."""

from dho.cli import main

if __name__ == "__main__":
    main()

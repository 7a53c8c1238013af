"""Thin entry so `python cli.py ...` works from a checkout."""

from dgate_export.cli import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`pipenv run ./publisher.py --help`: the same as `python -m wikipulse publish`."""

from wikipulse.cli import script

if __name__ == "__main__":
    script("publish")

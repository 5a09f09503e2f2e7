#!/usr/bin/env python3
"""`pipenv run ./subscriber.py --help`: the same as `python -m wikipulse subscribe`."""

from wikipulse.cli import script

if __name__ == "__main__":
    script("subscribe")

#!/usr/bin/env python3
"""`pipenv run ./dash_app.py --help`: the same as `python -m wikipulse dash`."""

from wikipulse.cli import script

if __name__ == "__main__":
    script("dash")

#!/usr/bin/env python3
"""Archive every event of the stream in ClickHouse: `pipenv run ./archiver.py --help`."""

from wikipulse.cli import script

if __name__ == "__main__":
    script("archive")

#!/usr/bin/env python3
"""Thin launcher: `python aivailable.py ARGS` is the same as `aivailable ARGS`."""

import sys

from aivailable.cli import main

if __name__ == "__main__":
    sys.exit(main())

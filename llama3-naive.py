#!/usr/bin/env python3
"""Llama 3 batch generation with the naive KV cache. Run with --help for the flags."""
import sys

from pagedllama.app.cli import main

if __name__ == "__main__":
    sys.exit(main("naive"))

"""`python -m pagedllama.download`, as the README spells it: the command lives in pagedllama/io/download.py."""
import sys

from pagedllama.io.download import main

if __name__ == "__main__":
    sys.exit(main())

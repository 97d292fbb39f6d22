"""`python -m pagedllama.compare`, as the README spells it: the command lives in pagedllama/app/compare.py."""
import sys

from pagedllama.app.compare import main

if __name__ == "__main__":
    sys.exit(main())

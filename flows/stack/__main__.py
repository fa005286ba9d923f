"""``python -m forgeline.flows.stack serve-prefect PORT``: the Prefect server process of ``forgeline up``."""

import sys

from forgeline.flows.stack.exposure import main

if __name__ == "__main__":
    main(sys.argv[1:])

"""``python -m forgeline`` is the ``forgeline`` command."""

from forgeline.flows.cli.main import main

if __name__ == "__main__":
    main()

"""``python -m flows`` (from a clone's root) is the ``forgeline`` command, as ``python -m forgeline`` is anywhere."""

from forgeline.flows.cli.main import main

if __name__ == "__main__":
    main()

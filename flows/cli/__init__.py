"""The ``forgeline`` command line: :mod:`forgeline.flows.cli.main` holds the app and the command table."""

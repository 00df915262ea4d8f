"""The ``jf-ray`` command line: one subcommand module per pipeline stage (see ``main.SUBCOMMANDS``)."""

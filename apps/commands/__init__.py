"""Argument parsing and ``run`` functions of the ``rfi`` commands, one module per command.

:mod:`apps.cli` lists each command with its module here, which defines
``register_<command>(parser)`` (the arguments, and ``parser.set_defaults(func=run)``) and
``run(args) -> exit code``. The libraries they call (``encoders``, ``inversion`` and the app
modules of :mod:`apps`) parse no arguments; :mod:`apps.commands.common` holds the argument
helpers several commands share.
"""

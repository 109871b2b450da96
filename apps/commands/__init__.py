"""Argument parsing and ``run`` functions of ``rfi`` commands, one module per command.

:mod:`apps.cli` lists each command with the module that registers it
(``register_<command>(parser)``); commands move here from the library packages so that
``encoders/`` and ``inversion/`` stay libraries.
"""

"""The `pipeline` commands, one module per command family. Each module's ``register`` adds its
parser and sets each action's handler; pipeline/cli.py lists the modules and runs the handler
a command line names.

Imports: see pipeline/cli.py.
"""

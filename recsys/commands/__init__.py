"""One module per ``recsys`` subcommand (argument parsing and printing only); the table is ``table.py``."""

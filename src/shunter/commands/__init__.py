"""Subcommands of the `shunter` command line: each parses its arguments and delegates."""

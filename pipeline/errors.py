"""Errors the CLI turns into one-line messages and exit codes (0 ok, 2 bad input, 1 failure, 130 interrupted)."""

from __future__ import annotations


class BadInput(ValueError):
    """The user's input (file, run store, option) is unusable; message names the file and the fix. Exit code 2."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

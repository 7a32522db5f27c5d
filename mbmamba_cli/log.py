"""Logging set-up shared by every command: one line per decision on stderr, through Rich on a terminal."""

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

LOGGER_NAME = "mbmamba"

# Progress bars and logs go to stderr so that `--json` output on stdout stays machine-readable.
stderr_console = Console(stderr=True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> logging.Logger:
    """Configure the package logger: WARNING with `quiet`, DEBUG with `verbose`, else INFO."""
    level = logging.INFO
    if quiet:
        level = logging.WARNING
    elif verbose:
        level = logging.DEBUG
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()

    # Rich wraps at 80 columns when stderr is not a terminal, which splits long paths in log files, so
    # pipelines get plain one-line records instead.
    if stderr_console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=stderr_console, show_path=False, show_time=False, markup=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """Return a child of the package logger, e.g. `get_logger(__name__)`."""
    short = name.removeprefix("mbmamba_cli.")
    return logging.getLogger(f"{LOGGER_NAME}.{short}")

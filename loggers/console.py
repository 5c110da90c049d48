"""Console logging for the entry points: short info lines, one-line warnings and errors."""

import logging
import sys


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return f"[{self.formatTime(record, '%H:%M:%S')}] {message}"


def setup_console_logging(level: int = logging.INFO) -> None:
    """Send the project's log records to stderr (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_deh_console", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    handler._deh_console = True
    root.addHandler(handler)
    root.setLevel(level)

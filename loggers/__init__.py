"""Console logging and the files of a run, all written atomically."""

from loggers.console import setup_console_logging
from loggers.run_directory import RunDirectory, RunDirectoryError, run_name

__all__ = ["RunDirectory", "RunDirectoryError", "run_name", "setup_console_logging"]

"""What every `python -m adaface.<command>` does alike: its parser, and how it ends on a bad option or a failed
write (argparse's way: usage, one line, exit status 2)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from ._cli import HelpFormatter, OptionError
from ._file_checks import os_error_line


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m adaface.<name>`, with the help layout every command shares."""
    return argparse.ArgumentParser(prog=f"python -m adaface.{name}", description=description,
                                   formatter_class=HelpFormatter)


@contextlib.contextmanager
def command_errors(parser: argparse.ArgumentParser, *, os_errors: bool = False, where: str = "",
                   note: str = "") -> Iterator[None]:
    """End the command as argparse ends a bad option (usage, one line, exit status 2): an OptionError with its
    message; with `os_errors` also an OSError (a full disk, a folder made read-only mid-run) as `where: the path
    and the system's reason note`, not a traceback."""
    try:
        yield
    except OptionError as e:
        parser.error(str(e))
    except OSError as e:
        if not os_errors:
            raise
        parser.error(" ".join(part for part in (f"{where}:" if where else "", os_error_line(e), note) if part))


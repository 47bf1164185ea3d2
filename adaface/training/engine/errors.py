"""The error a bad option or bad training data raises before any model is loaded (config and data share it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ConfigError(ValueError):
    """A configuration problem, reported before any model is loaded; the message names the option."""


@contextlib.contextmanager
def model_option(option: str, value: object) -> Iterator[None]:
    """A model file refused while loading (code, a hub kernel or a size over a limit: `UnsafeFileError`) as a
    one-line ConfigError naming the option."""
    from ...models._io import UnsafeFileError

    try:
        yield
    except UnsafeFileError as e:
        raise ConfigError(f"{option} {value}: {e}") from None

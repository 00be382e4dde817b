"""What every entry point shares: user mistakes end as one ``error: ...`` line and exit status 2, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from mpalign.config import ConfigError
from mpalign.zoo import ModelLoadError


class UserInputError(ValueError):
    """Bad input a user can fix (a path that does not exist, a box outside the image, ...)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ModelLoadError, UserInputError, FileNotFoundError)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

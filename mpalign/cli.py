"""What every entry point shares: user mistakes end as one ``error: ...`` line and exit status 2, not a traceback;
the console shows our own progress lines, Ray's and the libraries' detail goes to their log files (``--verbose``
brings it back)."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mpalign.config import ConfigError
from mpalign.zoo import IncompatibleModelError, ModelLoadError


class UserInputError(ValueError):
    """Bad input a user can fix (a path that does not exist, a box outside the image, ...)."""


# Mistakes a user fixes: a bad config or input, a model or adapter that cannot load, a path that is missing, not a
# folder, a folder where a file belongs, or not writable. (IncompatibleModelError is a ModelLoadError; it is named
# for the text search below.)
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ModelLoadError, IncompatibleModelError, UserInputError,
                                                FileNotFoundError, PermissionError, IsADirectoryError,
                                                NotADirectoryError)


def _wrapped(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions ``exc`` carries: Ray hands an error raised in a task, an actor or a training worker to the
    driver wrapped (``RayTaskError.cause``, Ray Train's ``worker_failures`` / ``controller_failure``), sometimes
    several times over, besides Python's own ``__cause__`` chain."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        yield cause
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(failure, BaseException):
            yield failure
    controller = getattr(exc, "controller_failure", None)
    if isinstance(controller, BaseException):
        yield controller
    if exc.__cause__ is not None:
        yield exc.__cause__


def user_error(exc: BaseException) -> BaseException | None:
    """The user mistake ``exc`` is or wraps (searched through Ray's wrappers), else None."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = list(_wrapped(current))
        # Ray's RayTaskError is made an instance of its cause's class, but its text is a whole remote traceback:
        # report the cause itself
        if isinstance(current, USER_ERRORS) and not isinstance(getattr(current, "cause", None), BaseException):
            return current
        pending += inner
    if type(exc).__module__.startswith("ray."):  # Ray Data hands UDF errors over as text only (the chain is lost)
        names = "|".join(cls.__name__ for cls in USER_ERRORS)
        match = re.search(rf"\b(?:{names}): (.+)", str(exc))
        if match:
            return UserInputError(match.group(1).strip())
    return None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Set by --verbose; read where Ray is started, also inside Ray's own processes (which inherit the environment).
VERBOSE_ENV = "MPALIGN_VERBOSE"


def verbose_console() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_console(verbose: bool) -> None:
    """Our own lines on the console, unless ``verbose``: Ray Data's execution plans and progress summaries go to its
    session log only (``ray_data_logging.yaml``), Ray's and Ray Train's INFO lines and Tune's status tables stay off
    (:func:`start_ray`, ``verbose_console``), library warnings (deprecations) and download progress bars are off.
    Environment variables, so that the Ray workers started later inherit them; a user's own setting wins."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for name, value in (("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml"))),
                        ("RAY_DATA_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("PYTHONWARNINGS", "ignore"),
                        # Tune's newer console engine prints its experiment table even at verbose=0; the older one
                        # is silent there (the sweep's one line per trial replaces both)
                        ("RAY_AIR_NEW_OUTPUT", "0")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")


# Ray Data lists Parquet files through a pool of footer-reading actors that it starts for every read (every epoch),
# 32 by default: sized for object stores far away, and on a small machine starting them costs more than the read
# (measured on 2 cores: the first batch of a 200-file dataset after 44 s with 32, 8 s with 2). One per two of this
# machine's CPUs (2 to 32) unless the variable is set.
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def ray_runtime_env() -> dict[str, Any]:
    """The runtime environment every ``ray.init`` of ours passes, so that every Ray process (and, through the
    environment it sets here, the driver) gets the same settings: see FOOTER_READERS_ENV."""
    readers = os.environ.get(FOOTER_READERS_ENV) or str(min(32, max(2, (os.cpu_count() or 2) // 2)))
    os.environ[FOOTER_READERS_ENV] = readers  # the driver builds the read plan; a local Ray's workers inherit it
    return {"env_vars": {FOOTER_READERS_ENV: readers}}


def start_ray(worker_logs: bool = True, **options: Any) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local Ray, unless connected already; Ray's INFO lines
    (where the dashboard is, ...) stay in its logs unless --verbose. ``worker_logs=False``: what Ray's workers print
    (library warnings, an actor's traceback when it is stopped) stays in the session's logs unless --verbose — for
    commands whose driver reports everything the user needs (errors still reach it as exceptions)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local",
                 logging_level=logging.INFO if verbose_console() else logging.WARNING,
                 log_to_driver=worker_logs or verbose_console(), runtime_env=ray_runtime_env(),
                 **options)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    quiet_console(verbose="--verbose" in arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        mistake = user_error(exc)
        if mistake is None:
            raise
        print(f"error: {one_line(mistake)}", file=sys.stderr)
        return 2


def check_writable(path: str | Path, what: str, folder: bool, remote_ok: bool = False) -> Path | str:
    """``path`` when it can be written (created if missing) as a ``folder`` or a file; a UserInputError otherwise.
    Entry points call this before loading models or starting Ray, so a bad output path costs seconds, not the run.
    A URI (``s3://...``) comes back as it is where the caller writes through a pyarrow filesystem (``remote_ok``)
    and is refused elsewhere: ``Path`` would turn it into a local folder named ``s3:``."""
    if "://" in str(path):
        if remote_ok:
            return str(path)
        raise UserInputError(f"{what} '{path}' must be a local or shared {'folder' if folder else 'file'} path: "
                             f"object storage (s3://, gs://) is not supported there")
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise UserInputError(f"{what} '{path}' is {'a file' if folder else 'a folder'}; give a "
                             f"{'folder' if folder else 'file'} path")
    existing = next(p for p in (path if path.exists() else path.parent, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserInputError(f"{what} '{path}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{what} '{path}' cannot be written: no write permission in '{existing}'")
    return path

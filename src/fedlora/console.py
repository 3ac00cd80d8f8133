"""What every command-line entry point shares: one-line user errors, quiet libraries, -s overrides.

Used by ``fedlora`` (cli.py), ``fedlora flower`` (flower/cli.py), the node worker and the compare
workers, so none of them imports another's command module.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from fedlora.errors import FedloraError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a FedloraError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedloraError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as err:  # a full or read-only disk: earlier outputs stay as they were
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise
            where = f" '{err.filename}'" if err.filename else ""
            typer.echo(f"error: cannot write{where} ({err.strerror or os.strerror(err.errno)}); free disk space or "
                       "choose another output.root, then `fedlora run --resume RUN_DIR`", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Library progress bars and warnings would break the one-line summary/error contract."""
    import warnings  # noqa: PLC0415

    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def overrides(pairs: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    from fedlora.config import parse_override  # noqa: PLC0415

    out = dict(parse_override(p) for p in pairs)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out

"""The Typer app, its --debug switch, and the one-line error handling every command shares."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from ..errors import MelafastError

__all__ = ["app", "friendly", "command_name", "main"]

_state = {"debug": False}  # set by the top-level callback on every invocation

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="melafast: melanoma detection from dermoscopic images + metadata (fastai + timm).")


def command_name(fn) -> str:
    "The name a command function is registered under: Typer's rule, less our `_cmd` suffix (stack_cmd: `stack`)."
    return fn.__name__.removesuffix("_cmd").replace("_", "-")


def friendly(fn):
    """Turn a MelafastError into one line on stderr and exit code 1; --debug shows the traceback instead.

    The line names the command that failed (`error: melafast predict: ...`), so a log of several steps says which one."""

    command = command_name(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MelafastError as e:
            if _state["debug"]:
                raise
            msg = str(e)
            if "Original Traceback" in msg:  # raised in a DataLoader worker: torch wraps it in the worker's traceback
                msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
            typer.echo(f"error: melafast {command}: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False):
    """melafast: train fold ensembles, predict and submit for the SIIM-ISIC melanoma task."""
    _state["debug"] = debug


def main():  # pragma: no cover - `python -m melafast`
    app(prog_name="melafast")

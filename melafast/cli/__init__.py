"""The `melafast` command line: thin Typer commands over the library (torch and fastai load inside commands).

    app          the Typer app, --debug, one-line errors      options      options and choices shared by commands
    train_cmd    train, lr-find                               predict_cmd  predict, submit, pseudo, ensemble, export,
                                                              serve, stack
    evaluate_cmd report, operating-point, calibrate, audit,  data_cmd     prepare, download, sample
                 card, compare
"""

from . import train_cmd, predict_cmd, evaluate_cmd, data_cmd  # noqa: F401, I001  (each registers its commands on `app`, in this order)
from .app import app, main

__all__ = ["app", "main"]

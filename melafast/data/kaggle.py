"""Kaggle API access: download the competition or a dataset, upload a submission. Clear errors offline."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

from ..errors import MelafastError

__all__ = ["COMPETITION", "kaggle_api", "upload_submission", "download"]

COMPETITION = "siim-isic-melanoma-classification"
_SUBMIT_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/submit"


_NO_CREDENTIALS = ("no usable Kaggle credentials: run `kaggle auth login`, or set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and "
                   "KAGGLE_KEY), or save your token in ~/.kaggle/")


def kaggle_api():
    """An authenticated Kaggle API client, or `MelafastError` saying what is missing."""
    import contextlib
    import io

    quiet = io.StringIO()  # the client prints long help and may exit() when it has no credentials
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except ImportError:
        raise MelafastError("the Kaggle API client is not installed: pip install 'melafast[kaggle]'") from None
    except (Exception, SystemExit):  # noqa: BLE001 - every failure here means "no usable credentials"
        raise MelafastError(_NO_CREDENTIALS) from None
    return api


def upload_submission(path, message: str = "melafast submission", competition: str = COMPETITION) -> None:
    """Submit `path` to the competition; the file stays where it is whatever happens."""
    try:
        api = kaggle_api()
        api.competition_submit(str(path), message, competition)
    except MelafastError as e:
        raise MelafastError(f"upload failed: {e}. {path} is written; upload it by hand at {_SUBMIT_URL}") from None
    except Exception as e:  # noqa: BLE001 - network errors come in many classes
        raise MelafastError(f"upload failed ({str(e).splitlines()[0][:200]}). {path} is written; "
                            f"upload it by hand at {_SUBMIT_URL}") from None


def download(dest="data", dataset: str | None = None, competition: str = COMPETITION, log: Callable = print) -> Path:
    """Download and unzip the competition files (or the Kaggle dataset `owner/name`) into `dest`."""
    dest = Path(dest)
    what = f"dataset {dataset}" if dataset else f"competition {competition}"
    try:
        api = kaggle_api()
        dest.mkdir(parents=True, exist_ok=True)
        log(f"downloading the {what} into {dest}/ ...")
        if dataset:
            api.dataset_download_files(dataset, path=str(dest), unzip=True, quiet=False)
        else:
            api.competition_download_files(competition, path=str(dest), quiet=False)
            for z in dest.glob("*.zip"):
                with zipfile.ZipFile(z) as f:
                    f.extractall(dest)
                z.unlink()
    except MelafastError as e:
        raise MelafastError(f"cannot download the {what}: {e}. Download it by hand from kaggle.com and unzip it "
                            f"into {dest}/, or try melafast on the synthetic sample (melafast sample)") from None
    except Exception as e:  # noqa: BLE001
        raise MelafastError(f"cannot download the {what} ({str(e).splitlines()[0][:200]}): are you online and have "
                            f"you accepted the competition rules? Or download by hand into {dest}/") from None
    return dest

"""Getting data ready: `prepare`, `download`, `sample` and `dedup`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..config import DUP_DISTANCE
from ..errors import MelafastError
from .app import app, friendly
from .options import ImagesOpt, SeedOpt


@app.command()
@friendly
def prepare(
    src: Annotated[Path, typer.Option("--src", help="Dataset folder to copy (train.csv, test.csv, images).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the resized copy.")],
    size: Annotated[int, typer.Option("--size", help="Shorter image side after resizing, in pixels.")] = 384,
    images: ImagesOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes (default: one per core).")] = None,
    hdf5: Annotated[bool, typer.Option("--hdf5", help="Write each split into one HDF5 store (train-image.hdf5, "
                                       "the ISIC 2024 layout) instead of JPEG folders.")] = False,
):
    """Write a resized copy of a dataset (shorter side = --size, aspect kept); reruns redo only what changed."""
    from ..data.prepare import prepare_dataset

    prepare_dataset(src, out, size=size, workers=workers, images=images, log=typer.echo, store=hdf5)


@app.command()
@friendly
def download(
    out: Annotated[Path, typer.Option("--out", help="Folder to download into.")] = Path("data"),
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="A Kaggle dataset owner/name instead of the competition.")] = None,
    competition: Annotated[str, typer.Option("--competition", help="The Kaggle competition (isic-2024-challenge for "
                                             "the 2024 data).")] = "siim-isic-melanoma-classification",
):
    """Download the competition (or a Kaggle dataset, e.g. a resized copy) with the Kaggle API."""
    from ..data.kaggle import download as kaggle_download

    kaggle_download(out, dataset=dataset, competition=competition, log=typer.echo)
    typer.echo(f"done: train with  melafast train --data {out}")


@app.command()
@friendly
def sample(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the synthetic dataset to.")] = Path("data/sample"),
    n_train: Annotated[int, typer.Option("--n-train", help="Training images.")] = 240,
    n_test: Annotated[int, typer.Option("--n-test", help="Test images.")] = 60,
    seed: SeedOpt = 0,
    format: Annotated[str, typer.Option("--format", help="isic2020 (train.csv + JPEG folders) or isic2024 (metadata "
                                        "CSVs keyed by isic_id + HDF5 image stores, several lesions per patient).")]
    = "isic2020",
):
    """Write a small SYNTHETIC dataset (drawn lesions) in the Kaggle layout, to try melafast without downloads."""
    if n_train < 4 or n_test < 1:
        raise MelafastError("--n-train must be at least 4 and --n-test at least 1")
    if format not in ("isic2020", "isic2024"):
        raise MelafastError(f"--format must be isic2020 or isic2024, got {format!r}")
    from ..data import make_sample, make_sample_2024

    make = make_sample if format == "isic2020" else make_sample_2024
    path = make(out, n_train=n_train, n_test=n_test, seed=seed)
    typer.echo(f"wrote a SYNTHETIC sample to {path}: {n_train} train + {n_test} test images (not real patients)")


@app.command()
@friendly
def dedup(
    data: Annotated[List[Path], typer.Argument(help="Dataset folders (their train and test images) or image folders.",
                                               show_default=False)],
    distance: Annotated[int, typer.Option("--distance", help="Bits (of the 256-bit perceptual hash, 0 to 31) at "
                                          "which two images count as near-duplicates.")] = DUP_DISTANCE,
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV of every image in a group (group, dataset, "
                                                "split, image_name, distance, fname).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Threads decoding images (default: one per "
                                                   "core).")] = None,
):
    """List near-duplicate images within and across datasets (the same lesion photographed twice, a resized copy,
    an image shared between challenge years), by perceptual hash; hashes are cached per image."""
    import os

    if not 0 <= distance <= 31:
        raise MelafastError(f"--distance must be between 0 and 31 bits, got {distance}")
    from ..atomic import write_csv
    from ..data.signatures import duplicate_table

    table = duplicate_table(data, distance, workers=workers or os.cpu_count() or 1)
    if table.empty:
        typer.echo(f"no near-duplicates within {distance} bits among the images of {', '.join(map(str, data))}")
        return
    groups = table.groupby("group")
    across = int(groups["dataset"].nunique().gt(1).sum())
    splits = int(groups["split"].agg(lambda s: {"train", "test"} <= set(s)).sum())
    typer.echo(f"{table['group'].nunique()} groups of near-duplicates (within {distance} bits) holding {len(table)} "
               f"images; {across} groups span two datasets, {splits} span a train and a test table")
    for g, part in list(groups)[:20]:
        typer.echo(f"  group {g}: " + ", ".join(f"{r.image_name} ({Path(r.dataset).name}/{r.split}, {r.distance} bits)"
                                                for r in part.itertuples()))
    if table["group"].nunique() > 20:
        typer.echo(f"  ... {table['group'].nunique() - 20} more groups" + ("" if out else ": --out FILE lists them all"))
    if out is not None:
        write_csv(table, out)
        typer.echo(f"wrote {out}")

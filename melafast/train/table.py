"""The training table of a run: the data folder found, the main table with its folds, and the rows that only train
(external data, pseudo-labels), each checked; shared by `train` and `lr-find`."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .. import __version__
from ..config import TrainConfig
from ..errors import DataError

__all__ = ["DEFAULT_DATA", "RunTable", "build_table", "resolve_data", "versions"]

DEFAULT_DATA = Path("data")  # where users put a Kaggle download; the synthetic sample goes to data/sample


def resolve_data(data=None, log: Callable = print) -> Path:
    """The dataset folder to use: `data`, or `data/sample`; with no `data` given and nothing in data/, the
    synthetic sample is written to data/sample first."""
    from ..data import find_dataset, make_sample

    found = find_dataset(data if data is not None else DEFAULT_DATA)
    if found is not None:
        return found.resolve()
    if data is not None:
        raise DataError(f"train.csv not found in {data} (nor in {Path(data) / 'sample'}): point --data at a dataset folder, "
                        "or run `melafast download` / `melafast sample --out PATH`")
    dest = DEFAULT_DATA / "sample"
    log(f"No dataset in {DEFAULT_DATA}/: writing the SYNTHETIC sample to {dest}/ (drawn lesions, not real patients). "
        f"Put a Kaggle download in {DEFAULT_DATA}/ (melafast download) to train on real images.")
    return make_sample(dest).resolve()


def versions() -> dict:
    import fastai
    import timm
    import torch

    return dict(melafast=__version__, fastai=fastai.__version__, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)")


@dataclass
class RunTable:
    """The rows a run trains and validates on, as `build_table` assembles them, and how they came together."""

    df: pd.DataFrame  # every row: the main table with its folds, then external and pseudo-labelled rows (fold -1)
    data: Path  # the dataset folder
    n_main: int  # rows of the main table (the ones the CV scores)
    n_external: int = 0  # external training rows
    n_pseudo: int = 0  # pseudo-labelled test rows
    bad: pd.DataFrame | None = None  # unusable images left out (--on-bad-image skip)
    pseudo_per_fold: bool = False  # fold k trains on the teacher's fold-k labels only (else the ensemble's)


def build_table(cfg: TrainConfig, log: Callable = print) -> RunTable:
    """The training table of `cfg`, the one `train` and `lr-find` both use: the dataset (its unusable images checked),
    the extra metadata features, patient-grouped folds, then external rows and pseudo-labels, which only train."""
    from ..data import (add_external, add_meta_features, add_patient_features, add_pseudo, check_images,
                        check_teacher_folds, clean_columns, load_competition, make_folds, patient_feature_names,
                        read_pseudo, resolve_columns)
    from ..data.features import PATIENT_SUFFIXES
    from ..runfolder import RunFolder

    workers = max(cfg.workers if cfg.workers is not None else (os.cpu_count() or 1), 2)
    data = resolve_data(cfg.data, log)
    train, test = load_competition(data, images=cfg.images)
    declared = cfg.meta and bool(cfg.cat or cfg.cont or cfg.patient_features)
    if declared:  # the columns the user declared, checked; config.json then records the ones the run uses
        given = [c for c in cfg.cont if not (cfg.patient_features and c.endswith(PATIENT_SUFFIXES))]  # (a resume)
        cfg.cat, cfg.cont = resolve_columns(train, test, cfg.cat, given, log)
        train = clean_columns(train, cfg.cat, cfg.cont, data / "train.csv")
        test = None if test is None else clean_columns(test, cfg.cat, cfg.cont, data / "test.csv")
        base = list(cfg.cont)  # the declared continuous columns (their patient features join below)
        if cfg.patient_features:  # each table over its own rows, no labels: as predict computes them
            train = add_patient_features(train, base)
            test = None if test is None else add_patient_features(test, base)
            cfg.cont = [*base, *patient_feature_names(base)]
        log(f"metadata columns: categorical {', '.join(cfg.cat) or '(none)'}; continuous {', '.join(cfg.cont) or '(none)'}")
    train, bad = check_images(train, cfg.on_bad_image, workers=workers)
    together = ()
    if cfg.dedup >= 0:  # near-duplicate images (one lesion photographed twice, a copy) stay in one fold
        from ..data.signatures import duplicate_clusters, with_signatures

        train = with_signatures(train, workers=workers)
        train["dup_cluster"], together = duplicate_clusters(train, cfg.dedup), ("dup_cluster",)
        n_dup = int(train["dup_cluster"].notna().sum())
        if n_dup:
            log(f"near-duplicates: {n_dup} images in {train['dup_cluster'].nunique()} groups (perceptual hashes at "
                f"most {cfg.dedup} bits apart), each group kept in one fold")
    df = make_folds(add_meta_features(train) if cfg.extra_meta else train, n_folds=cfg.folds, seed=cfg.seed,
                    group_by=cfg.group_by, together=together)
    if cfg.group_by != "patient_id":  # few groups: say which fold validates which
        held = df.groupby("fold")[cfg.group_by].agg(lambda v: ", ".join(sorted(map(str, v.dropna().unique()))))
        values = df[cfg.group_by].nunique()
        whole = df[[cfg.group_by, "patient_id"]].dropna().groupby("patient_id")[cfg.group_by].nunique().gt(1).sum() \
            if "patient_id" in df.columns else 0
        log(f"folds grouped by {cfg.group_by} ({values} values, each patient kept whole"
            + (f"; {whole} patients have images under several values, which joins those values in one fold"
               if whole else "") + "): "
            + "; ".join(f"fold {k} validates {v or '(rows without a value)'}" for k, v in held.items()))
    elif "attribution" in df.columns and df["attribution"].nunique() > 1:
        log(f"the data names {df['attribution'].nunique()} institutions (attribution): the folds mix them, so the CV "
            "scores clinics it trained on; --group-by attribution holds whole institutions out")
    table = RunTable(df, data, len(df), bad=bad)
    for path in cfg.external:
        ext, _ = load_competition(path)
        ext = clean_columns(ext, cfg.cat, base, path) if declared else ext
        if declared and cfg.patient_features:
            ext = add_patient_features(ext, base)
        ext, ext_bad = check_images(ext, cfg.on_bad_image, workers=workers)
        if cfg.dedup >= 0:  # an external copy of a main-table image would train the fold that validates it
            from ..data.signatures import cross_duplicates, with_signatures

            ext = with_signatures(ext, workers=workers)
            renamed = ext[~ext["image_name"].isin(df["image_name"])]  # the same names are dropped below, as such
            copies = cross_duplicates(renamed.reset_index(drop=True), df, cfg.dedup)
            if len(copies):
                log(f"external data {path}: {len(copies)} images are near-duplicates of main-table images (e.g. "
                    f"{copies['image_name'].iloc[0]} of {copies['duplicate_of'].iloc[0]}, {copies['distance'].iloc[0]} "
                    "bits apart): dropped")
                ext = ext[~ext["image_name"].isin(copies["image_name"])]
        ext = add_meta_features(ext) if cfg.extra_meta else ext
        table.df, n_dup = add_external(table.df, ext)
        added = table.df.iloc[len(table.df) - (len(ext) - n_dup):]
        shared = int(added["home_fold"].notna().sum())
        log(f"external data {path}: {len(ext) - n_dup} training rows added ({int(ext['target'].sum())} melanomas in "
            f"the file), {n_dup} already present dropped" + (f", {len(ext_bad)} unusable images skipped" if len(ext_bad) else "")
            + (f"; {shared} of them belong to {added['patient_id'][added['home_fold'].notna()].nunique()} patient(s) of "
               "the main table and train every fold but the one that validates their patient" if shared else ""))
    table.n_external = len(table.df) - table.n_main
    if cfg.pseudo:
        pseudo = read_pseudo(cfg.pseudo)
        info = RunFolder.pseudo_info(cfg.pseudo)
        if test is not None:
            test = add_meta_features(test) if cfg.extra_meta else test  # per-patient counts over the whole test set
            test = test[test["image_name"].isin(pseudo["image_name"])]
            test, test_bad = check_images(test, cfg.on_bad_image, workers=workers)
            pseudo = pseudo[~pseudo["image_name"].isin(test_bad["image_name"])]
        table.pseudo_per_fold = any(c.startswith("soft_target_fold") for c in pseudo.columns)
        if table.pseudo_per_fold:
            check_teacher_folds(table.df, info.get("fold_of", {}), cfg.pseudo, info.get("run", ""))
        n_before = len(table.df)
        table.df = add_pseudo(table.df, test, pseudo)
        added = table.df.iloc[n_before:]
        table.n_pseudo = len(added)
        how = ("fold k trains only on the pseudo-labels of the teacher's fold-k model, so the CV stays honest"
               if table.pseudo_per_fold else "the labels come from the teacher's whole fold ensemble, which saw every "
               "fold's labels: the CV is optimistic")
        log(f"pseudo-labels {cfg.pseudo}: {len(added)} soft-labelled test images join the training folds; {how}; "
            "validation keeps the labelled images only")
    return table



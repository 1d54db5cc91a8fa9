"""`melafast stack`: gradient-boosted trees on the table's features and the image models' out-of-fold predictions.

The 2024 challenge was won by stacking: an image model's score beside the lesion's measurements (and its patient's
other lesions), fed to gradient-boosted trees. Here the trees are scikit-learn's `HistGradientBoostingClassifier`
(missing values and categories handled natively), cross-validated on the run's own folds: fold k's trees learn from
the other folds' rows only, whose image scores are themselves out-of-fold, and score fold k, so the stacked CV stays
honest. Nothing is pickled: the trees are refitted from the run's out-of-fold rows and the recorded settings when
`submit --stack` needs them (deterministic), and the refit is checked against the saved stacked predictions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, MelafastError, RunError

__all__ = ["stack_run", "stack_ready", "stack_predict", "TREE_PARAMS"]

TREE_PARAMS = dict(learning_rate=0.05, max_iter=200, max_leaf_nodes=15, min_samples_leaf=20, l2_regularization=1.0,
                   early_stopping=False)  # fixed, not tuned on the rows they score
STACK_JSON, STACK_OOF = "stack.json", "stack_oof.csv"


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _table(data, cat, cont, patient_features, split="train") -> pd.DataFrame:
    "The split's table (no images needed) with the feature columns cleaned, and patient features when asked."
    from ..data import read_table
    from ..layout import split_csv
    from .inputs import clean_table

    data = Path(data)
    csv = split_csv(data, split)
    if not csv.is_file():
        raise DataError(f"{data} has no {split}.csv: the stack needs the table's features")
    return clean_table(read_table(csv, required=("image_name",)), cat, cont, cont if patient_features else (), csv)


def _matrix(df, cat, cont, vocab, image_pred) -> pd.DataFrame:
    "Trees' inputs: each category as its index in `vocab` (missing: NaN), numbers as they are, the image logit."
    X = pd.DataFrame(index=df.index)
    for c in cat:
        codes = {v: i for i, v in enumerate(vocab[c])}
        X[c] = df[c].map(lambda v: codes.get(v, np.nan) if isinstance(v, str) else np.nan).astype(float)
    for c in cont:
        X[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    X["image_logit"] = _logit(image_pred)
    return X


def _fit(X, y, n_cat, seed):
    from sklearn.ensemble import HistGradientBoostingClassifier

    mask = [True] * n_cat + [False] * (X.shape[1] - n_cat)
    return HistGradientBoostingClassifier(categorical_features=mask if n_cat else None, random_state=seed,
                                          **TREE_PARAMS).fit(X.to_numpy(), y)


def _fingerprint(X: pd.DataFrame, y) -> str:
    h = hashlib.sha256(np.ascontiguousarray(X.to_numpy(np.float64)).tobytes())
    h.update(np.asarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def _columns(info, cat, cont):
    "The trees' columns: those asked for, or the run's own metadata columns (`RunInfo`)."
    if cat is None and cont is None:
        cat, cont = info.metadata_columns
    return list(cat or []), list(cont or [])


def _training(folder, data, cat, cont, patient_features):
    "(rows: OOF rows with their features, X, y, vocab, the feature names)."
    from ..data import patient_feature_names

    oof = folder.oof(need="the stack learns from the run's out-of-fold image predictions")
    table = _table(data, cat, cont, patient_features)
    missing = sorted(set(oof["image_name"]) - set(table["image_name"]))
    if missing:
        raise DataError(f"{data} does not hold the run's images: {len(missing)} out-of-fold images are not in its "
                        f"table (e.g. {', '.join(missing[:3])}); pass --data")
    rows = oof.merge(table.drop(columns=["target", "fold"], errors="ignore"), on="image_name", how="left")
    cont_all = cont + (patient_feature_names(cont) if patient_features else [])
    vocab = {c: sorted(str(v) for v in table[c].dropna().unique()) for c in cat}
    X = _matrix(rows, cat, cont_all, vocab, rows["pred"])
    return rows, X, rows["target"].to_numpy().astype(int), vocab, cont_all


def stack_run(run, cat=None, cont=None, patient_features: bool = False, data=None, seed: int = 0,
              n_boot: int = 1000, log: Callable = print) -> dict:
    """Cross-validate the trees on `run`'s folds; write stack.json (settings, figures, fingerprint) and stack_oof.csv
    into the run, print image-only vs stacked OOF AUC and pAUC with a paired patient-bootstrap interval. `cat`/`cont`
    default to the run's metadata columns."""
    from ..atomic import write_csv, write_json
    from ..metrics import auc, paired_bootstrap, pauc
    from ..runfolder import RunFolder

    folder = RunFolder(run)
    cat, cont = _columns(folder.info(), cat, cont)
    data = folder.data_for(data)
    rows, X, y, vocab, cont_all = _training(folder, data, cat, cont, patient_features)
    if y.min() == y.max():
        raise RunError("the stack needs melanomas and benign lesions among the out-of-fold rows")
    stacked = np.zeros(len(rows))
    for k in sorted(rows["fold"].unique()):
        mine = (rows["fold"] == k).to_numpy()
        if len(np.unique(y[~mine])) < 2:
            raise RunError(f"the folds other than {k} hold one class only: the stack cannot learn from them")
        trees = _fit(X[~mine], y[~mine], len(cat), seed)
        stacked[mine] = trees.predict_proba(X[mine].to_numpy())[:, 1]
    groups = rows["patient_id"] if "patient_id" in rows.columns else None
    cmp = paired_bootstrap(y, rows["pred"], stacked, groups, n_boot=n_boot)
    result = dict(columns=dict(cat=cat, cont=cont_all), patient_features=patient_features, vocab=vocab, seed=seed,
                  trees=TREE_PARAMS, fingerprint=_fingerprint(X, y), n_rows=len(rows),
                  image_auc=auc(y, rows["pred"]), stack_auc=auc(y, stacked), image_pauc=pauc(y, rows["pred"]),
                  stack_pauc=pauc(y, stacked), comparison=cmp.to_dict("records"))
    write_json(result, folder.path / STACK_JSON)
    write_csv(rows[["image_name", "fold", "target"]].assign(pred_image=rows["pred"].to_numpy(), pred_stack=stacked),
              folder.path / STACK_OOF)
    log(f"stack on {len(rows)} out-of-fold images: trees on {', '.join(cat + cont_all)} and the image score, "
        f"cross-validated on the run's {rows['fold'].nunique()} folds")
    for r in cmp.itertuples():
        log(f"  {r.metric:22s} image {r.a:.4f}  stacked {r.b:.4f}  difference {r.diff:+.4f} [{r.lo:+.4f}, {r.hi:+.4f}]")
    log(f"wrote {folder.path / STACK_JSON} and {folder.path / STACK_OOF}")
    return result


def stack_ready(run, data=None, log: Callable = print) -> dict:
    """Everything `stack_predict` needs that can fail without a model: the run's stack.json, its data folder's train
    and test tables, and the fingerprint of the rows the stack was fitted on. Checked before any image is scored;
    says so when `melafast stack` measured the stack below the image score alone."""
    from ..data.features import PATIENT_SUFFIXES
    from ..runfolder import RunFolder

    folder = RunFolder(run)
    data = folder.check_stack(data)
    spec = json.loads(folder.stack_file.read_text())
    cat, cont = spec["columns"]["cat"], [c for c in spec["columns"]["cont"] if not c.endswith(PATIENT_SUFFIXES)]
    rows, X, y, _, cont_all = _training(folder, data, cat, cont, spec["patient_features"])
    if _fingerprint(X, y) != spec["fingerprint"]:
        raise RunError(f"the out-of-fold rows or the table of {folder.path} changed since `melafast stack`: run it "
                       "again")
    if spec.get("stack_auc") is not None and spec["stack_auc"] < spec["image_auc"]:
        log(f"warning: `melafast stack` measured the stack below the image score alone on the out-of-fold rows (AUC "
            f"{spec['stack_auc']:.4f} vs {spec['image_auc']:.4f}): a submission without --stack may score higher")
    test_table = _table(data, cat, cont, spec["patient_features"], split="test").set_index("image_name")
    return dict(folder=folder, spec=spec, cat=cat, cont_all=cont_all, rows=rows, X=X, y=y, test_table=test_table)


def stack_predict(run, test: pd.DataFrame, per_model: dict, data=None, ready: dict | None = None) -> np.ndarray:
    """The stacked melanoma probability of the `test` rows: fold k's trees (refitted from the run's out-of-fold rows
    and stack.json, checked against the saved stacked predictions) on the test table's features and fold k's image
    model's probabilities (`per_model`: fold -> array), averaged over the folds. `ready`: `stack_ready`'s answer,
    when already checked."""
    ready = ready or stack_ready(run, data, log=lambda m: None)
    folder, spec, cat, cont_all = ready["folder"], ready["spec"], ready["cat"], ready["cont_all"]
    rows, X, y = ready["rows"], ready["X"], ready["y"]
    saved = pd.read_csv(folder.path / STACK_OOF)
    feats = ready["test_table"].loc[test["image_name"]].reset_index()
    out, check = [], np.zeros(len(rows))
    for k in sorted(rows["fold"].unique()):
        if int(k) not in per_model:
            raise RunError(f"fold {k}'s image model gave no test predictions")
        mine = (rows["fold"] == k).to_numpy()
        trees = _fit(X[~mine], y[~mine], len(cat), spec["seed"])
        check[mine] = trees.predict_proba(X[mine].to_numpy())[:, 1]
        out.append(trees.predict_proba(_matrix(feats, cat, cont_all, spec["vocab"], per_model[int(k)]).to_numpy())[:, 1])
    if not np.allclose(check, saved["pred_stack"].to_numpy(), atol=1e-9):
        raise MelafastError("the refitted stack does not reproduce its saved out-of-fold predictions (another "
                            "scikit-learn?): run `melafast stack` again")
    return np.mean(out, axis=0)

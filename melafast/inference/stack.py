"""`melafast stack`: a model of the table's features and the image models' out-of-fold scores, which never ranks
worse than the image score alone (see `stackfit` for how).

The 2024 challenge was won by stacking: an image model's score beside the lesion's measurements (and its patient's
other lesions), fed to gradient-boosted trees. Here the model (`learners`: scikit-learn's trees by default, or
LightGBM, XGBoost, CatBoost, logistic regression) is cross-fitted on the run's own folds: fold k's model learns from
the other folds' rows only, whose image scores are themselves out-of-fold, and scores fold k, so the stacked CV
stays honest. Every fitted model is saved as text under `stack_models/` (nothing pickled, nothing refitted):
`submit --stack` loads them and applies fold k's to fold k's image model's test scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, RunError
from ..metrics import sigmoid
from .learners import SHAPE, learner
from .stackfit import BAG_SHARE, WEIGHTS, calibration, combine, cross_fit, image_scale, scaled

__all__ = ["STACK_FORMAT", "stack_run", "stack_ready", "stack_predict"]

STACK_FORMAT = 2  # 1: trees refitted at submit (no saved models)
STACK_JSON, STACK_OOF, MODELS = "stack.json", "stack_oof.csv", "stack_models"
HELPS = "helps"  # the verdicts stack.json records, from the paired interval of stacked - image AUC


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


def _matrix(df, cat, cont, vocab, z) -> pd.DataFrame:
    """The model's inputs: each category one column per value it took in training (1 when it is that value; 0 for a
    missing or unseen one), numbers as they are (missing: NaN), and the scaled image score `z` last."""
    X = pd.DataFrame(index=df.index)
    for c in cat:
        values = df[c].map(lambda x: str(x) if pd.notna(x) else None)
        for v in vocab[c]:
            X[f"{c}={v}"] = (values == v).astype(float)
    for c in cont:
        X[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    X["image_z"] = np.asarray(z, dtype=np.float64)
    return X


def _oof_fingerprint(oof: pd.DataFrame) -> str:
    "What the stack was fitted from: the run's out-of-fold rows (names, folds, scores)."
    h = hashlib.sha256("\n".join(oof["image_name"].astype(str)).encode())
    h.update(oof["fold"].to_numpy(np.int64).tobytes())
    h.update(oof["pred"].to_numpy(np.float64).tobytes())
    return h.hexdigest()


def _columns(info, cat, cont):
    "The model's columns: those asked for, or the run's own metadata columns (`RunInfo`)."
    if cat is None and cont is None:
        cat, cont = info.metadata_columns
    return list(cat or []), list(cont or [])


def _training(folder, data, cat, cont, patient_features):
    "(rows: OOF rows with their features, the fold models' scales, X, y, vocab, the continuous feature names)."
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
    scales = {int(k): image_scale(part["pred"]) for k, part in rows.groupby("fold")}
    z = np.zeros(len(rows))
    for k, s in scales.items():
        mine = (rows["fold"] == k).to_numpy()
        z[mine] = scaled(rows["pred"][mine], s)
    X = _matrix(rows, cat, cont_all, vocab, z)
    return oof, rows, scales, X, rows["target"].to_numpy().astype(int), vocab, cont_all


def _verdict(cmp: pd.DataFrame, fits) -> tuple:
    "(verdict, the sentence that says it) from the paired AUC interval and the weights the folds chose."
    r = cmp[cmp["metric"] == "AUC"].iloc[0]
    if all(f.weight == 0 for f in fits):
        return "nothing", ("the table adds nothing here: every fold kept the image score alone (weight 0), so the "
                           "stack ranks as the image score scaled per fold model does")
    if r["lo"] > 0:
        return HELPS, f"the table helps: AUC {r['diff']:+.4f}, interval [{r['lo']:+.4f}, {r['hi']:+.4f}] above 0"
    if r["hi"] < 0:
        return "costs", (f"the stack costs AUC here ({r['diff']:+.4f}, interval [{r['lo']:+.4f}, {r['hi']:+.4f}]): "
                         "submit without --stack")
    return "unclear", (f"the table adds nothing measurable here: AUC {r['diff']:+.4f}, interval [{r['lo']:+.4f}, "
                       f"{r['hi']:+.4f}] holds 0")


def stack_run(run, cat=None, cont=None, patient_features: bool = False, data=None, model: str = "trees",
              bags: int = 5, seed: int = 0, n_boot: int = 1000, log: Callable = print) -> dict:
    """Cross-fit the stack on `run`'s folds; write stack.json (settings, figures, each fold's scale, weight and
    models), the models under stack_models/ and stack_oof.csv into the run; print the image score's and the stack's
    OOF AUC and pAUC with a paired patient-bootstrap interval, and whether the table helps. `cat`/`cont` default to
    the run's metadata columns."""
    from ..atomic import write_csv, write_json, write_text
    from ..metrics import auc, paired_bootstrap, pauc, top_n_sensitivity
    from ..runfolder import RunFolder

    kind = learner(model)
    if bags < 1:
        raise RunError("--bags must be at least 1")
    folder = RunFolder(run)
    cat, cont = _columns(folder.info(), cat, cont)
    data = folder.data_for(data)
    oof, rows, scales, X, y, vocab, cont_all = _training(folder, data, cat, cont, patient_features)
    if y.min() == y.max():
        raise RunError("the stack needs melanomas and benign lesions among the out-of-fold rows")
    if rows["fold"].nunique() < 2:
        raise RunError(f"the stack is cross-fitted on the run's folds, and the out-of-fold rows of {folder.path} come "
                       f"from fold {rows['fold'].iloc[0]} alone (trained with --fold?): finish the other folds first")
    groups = rows["patient_id"].to_numpy(object) if "patient_id" in rows.columns else None
    log(f"stack ({model}) on {len(rows)} out-of-fold images: {', '.join(cat + cont_all) or 'no table column'} and "
        f"the image score (scaled per fold model), cross-fitted on the run's {rows['fold'].nunique()} folds")
    stacked, alone, fits = cross_fit(kind, X.to_numpy(), y, rows["fold"].to_numpy(), groups, bags, seed, log)
    calib = calibration(stacked, y)  # one logistic map of the stacked score to a probability: ranks unchanged
    pred_stack = sigmoid(calib[0] + calib[1] * stacked)
    cmp = paired_bootstrap(y, rows["pred"], pred_stack, groups, n_boot=n_boot)
    verdict, sentence = _verdict(cmp, fits)
    models_dir = folder.path / MODELS
    models_dir.mkdir(exist_ok=True)
    for old in models_dir.glob("fold*"):
        old.unlink()
    folds = []
    for f in fits:
        files = []
        for b, m in enumerate(f.models):
            name = f"fold{f.fold}-bag{b}{kind.suffix}"
            text = kind.dump(m)
            write_text(text, models_dir / name)
            files.append(dict(file=f"{MODELS}/{name}", sha256=hashlib.sha256(text.encode()).hexdigest()))
        folds.append(dict(fold=f.fold, scale=list(scales[f.fold]), calibration=list(f.calib), weight=f.weight,
                          stacked_scale=list(f.scale), rounds=f.rounds,
                          inner_auc={str(w): a for w, a in f.inner_auc.items()}, models=files))
    top = (lambda p: top_n_sensitivity(y, p, groups)) if groups is not None else (lambda p: None)
    result = dict(format=STACK_FORMAT, model=model, columns=dict(cat=cat, cont=cont_all), features=list(X.columns),
                  patient_features=patient_features, vocab=vocab, seed=seed, bags=len(fits[0].models),
                  bag_share=BAG_SHARE, shape=SHAPE, weights=list(WEIGHTS), oof_fingerprint=_oof_fingerprint(oof), n_rows=len(rows),
                  folds=folds, calibration=list(calib),
                  image_auc=auc(y, rows["pred"]), image_scaled_auc=auc(y, X["image_z"]), model_auc=auc(y, alone),
                  stack_auc=auc(y, stacked), image_pauc=pauc(y, rows["pred"]), stack_pauc=pauc(y, stacked),
                  image_top15=top(rows["pred"].to_numpy()), stack_top15=top(stacked),
                  verdict=verdict, comparison=cmp.to_dict("records"))
    write_json(result, folder.path / STACK_JSON)
    write_csv(rows[["image_name", "fold", "target"]].assign(pred_image=rows["pred"].to_numpy(), image_z=X["image_z"],
                                                             pred_model=sigmoid(calib[0] + calib[1] * alone),
                                                             pred_stack=pred_stack), folder.path / STACK_OOF)
    log(f"  AUC of the image score pooled as given {result['image_auc']:.4f}, scaled per fold model "
        f"{result['image_scaled_auc']:.4f}; the {model} model alone (weight 1) {result['model_auc']:.4f}")
    for r in cmp.itertuples():
        log(f"  {r.metric:22s} image {r.a:.4f}  stacked {r.b:.4f}  difference {r.diff:+.4f} [{r.lo:+.4f}, {r.hi:+.4f}]")
    if result["image_top15"] is not None:
        log(f"  {'top-15 sensitivity':22s} image {result['image_top15']:.4f}  stacked {result['stack_top15']:.4f}")
    log(f"  {sentence}")
    log(f"wrote {folder.path / STACK_JSON}, {models_dir}/ and {folder.path / STACK_OOF}")
    return result


def _spec(folder) -> dict:
    spec = json.loads(folder.stack_file.read_text())
    if spec.get("format") != STACK_FORMAT:
        raise RunError(f"{folder.stack_file} was written by an older melafast, whose stack was refitted at submit: "
                       f"run `melafast stack --run {folder.path}` again")
    return spec


def stack_ready(run, data=None, log: Callable = print) -> dict:
    """Everything `stack_predict` needs that can fail without an image model: the run's stack.json, its models
    (loaded, each checked against the checksum written beside it), the test table, and the out-of-fold rows the stack
    was fitted from. Checked before any image is scored; warns when `melafast stack` measured the stack below the
    image score alone."""
    from ..data.features import PATIENT_SUFFIXES
    from ..runfolder import RunFolder

    folder = RunFolder(run)
    data = folder.check_stack(data)
    spec = _spec(folder)
    if _oof_fingerprint(folder.oof(need="the stack was fitted on them")) != spec["oof_fingerprint"]:
        raise RunError(f"the out-of-fold rows of {folder.path} changed since `melafast stack` (the fold models were "
                       "trained again?): run it again")
    kind = learner(spec["model"])
    models = {}
    for f in spec["folds"]:
        models[f["fold"]] = []
        for m in f["models"]:
            path = folder.path / m["file"]
            if not path.is_file():
                raise RunError(f"{path} is missing: run `melafast stack --run {folder.path}` again")
            text = path.read_text()
            if hashlib.sha256(text.encode()).hexdigest() != m["sha256"]:
                raise RunError(f"{path} is not the model `melafast stack` wrote (its checksum differs): run it again")
            models[f["fold"]].append(kind.load(text))
    if spec["stack_auc"] < spec["image_auc"]:
        log(f"warning: `melafast stack` measured the stack below the image score alone on the out-of-fold rows (AUC "
            f"{spec['stack_auc']:.4f} vs {spec['image_auc']:.4f}): a submission without --stack may score higher")
    cat = spec["columns"]["cat"]
    cont = [c for c in spec["columns"]["cont"] if not c.endswith(PATIENT_SUFFIXES)]
    test_table = _table(data, cat, cont, spec["patient_features"], split="test").set_index("image_name")
    return dict(folder=folder, spec=spec, kind=kind, models=models, test_table=test_table)


def stack_predict(run, test: pd.DataFrame, per_model: dict, data=None, ready: dict | None = None) -> np.ndarray:
    """The stacked melanoma probability of the `test` rows: each fold's saved models on the test table's features
    and that fold's image model's probabilities (`per_model`: fold -> array), scaled as its out-of-fold scores were;
    the folds' stacked scores averaged, then mapped to a probability as the out-of-fold ones were. `ready`:
    `stack_ready`'s answer, when already checked."""
    ready = ready or stack_ready(run, data, log=lambda m: None)
    spec, kind = ready["spec"], ready["kind"]
    feats = ready["test_table"].loc[test["image_name"]].reset_index()
    out = []
    for f in spec["folds"]:
        if f["fold"] not in per_model:
            raise RunError(f"fold {f['fold']}'s image model gave no test predictions")
        z = scaled(per_model[f["fold"]], f["scale"])
        X = _matrix(feats, spec["columns"]["cat"], spec["columns"]["cont"], spec["vocab"], z)
        if list(X.columns) != spec["features"]:
            raise RunError("internal: the test table's features are not the stack's")
        margin = np.mean([kind.margin(m, X.to_numpy(), f["rounds"]) for m in ready["models"][f["fold"]]], axis=0)
        out.append(combine(z, margin, f["calibration"], f["weight"], f["stacked_scale"]))
    a, b = spec["calibration"]
    return sigmoid(a + b * np.mean(out, axis=0))


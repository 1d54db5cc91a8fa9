"""The models `melafast stack` can put on the table: scikit-learn's histogram trees (the default, no extra package),
LightGBM, XGBoost and CatBoost (the libraries the 2024 winners used: `pip install 'melafast[boost]'`), and a
logistic baseline. Every one is kept monotone (never decreasing) in the image score, the last column of its inputs,
and saves as text that loads without running code: our own JSON of the scikit-learn trees and of the logistic
coefficients, LightGBM's text model, XGBoost's and CatBoost's JSON models.

A learner answers raw margins (log-odds). `fit` with `curve=(X, y)` also answers the mean log loss on those rows
after each round, from which the stack picks its number of rounds (early stopping on rows the trees never saw).
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from ..errors import MelafastError

__all__ = ["LEARNERS", "MAX_ROUNDS", "Learner", "learner"]

MAX_ROUNDS = 400  # the most rounds early stopping may choose
SHAPE = dict(learning_rate=0.05, leaves=4, min_leaf=25, l2=1.0)  # few, large leaves: a small table, a strong score
LEARNERS = ("trees", "lightgbm", "xgboost", "catboost", "logistic")
PACKAGES = dict(lightgbm="lightgbm", xgboost="xgboost", catboost="catboost")


def _log_loss_curve(y, margins) -> np.ndarray:
    "Mean log loss of each row of `margins` (rounds x rows) against `y`."
    y = np.asarray(y, dtype=float)
    m = np.asarray(margins, dtype=float)
    return (np.logaddexp(0, m) - y * m).mean(axis=1)


def _monotone(X) -> list:
    "The monotone constraint of every learner: none on the table's columns, never decreasing in the image score."
    return [0] * (X.shape[1] - 1) + [1]


def _min_leaf(n: int) -> int:
    return max(SHAPE["min_leaf"], n // 50)


class Learner:
    "One kind of model: fit, raw margins, and its text form."

    name = ""
    suffix = ".json"
    rounds = True  # boosted: its number of rounds is chosen by early stopping

    def fit(self, X, y, rounds: int, seed: int, curve=None):
        "(fitted model, the mean log loss on `curve`'s rows after each round, or None without `curve`)."
        raise NotImplementedError

    def margin(self, model, X, rounds: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def dump(self, model) -> str:
        raise NotImplementedError

    def load(self, text: str):
        raise NotImplementedError


class SklearnTrees(Learner):
    """scikit-learn's `HistGradientBoostingClassifier`, saved as JSON of its nodes (split feature, threshold, where
    a missing value goes, leaf values) and answered by a numpy walk of those nodes, equal to scikit-learn's own."""

    name = "trees"

    def fit(self, X, y, rounds, seed, curve=None):
        from sklearn.ensemble import HistGradientBoostingClassifier

        m = HistGradientBoostingClassifier(learning_rate=SHAPE["learning_rate"], max_iter=rounds,
                                           max_leaf_nodes=SHAPE["leaves"], min_samples_leaf=_min_leaf(len(X)),
                                           l2_regularization=SHAPE["l2"], early_stopping=False,
                                           monotonic_cst=_monotone(X), categorical_features=None,
                                           random_state=seed).fit(X, y)
        model = self._export(m)
        if curve is None:
            return model, None
        staged = np.array([d.ravel() for d in m.staged_decision_function(curve[0])])
        return model, _log_loss_curve(curve[1], staged)

    @staticmethod
    def _export(m) -> dict:
        "The fitted trees as plain lists (scikit-learn keeps them as `TreePredictor` node arrays)."
        keys = ("feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf", "value")
        if any(p.nodes["is_categorical"].any() for (p,) in m._predictors):
            raise MelafastError("internal: a categorical split in the stack's trees")
        return dict(baseline=float(np.ravel(m._baseline_prediction)[0]),
                    trees=[{k: p.nodes[k].tolist() for k in keys} for (p,) in m._predictors])

    def margin(self, model, X, rounds=None):
        X = np.asarray(X, dtype=np.float64)
        out = np.full(len(X), model["baseline"])
        rows = np.arange(len(X))
        for t in model["trees"][:rounds]:
            feat, thr, miss = np.asarray(t["feature_idx"]), np.asarray(t["num_threshold"]), np.asarray(t["missing_go_to_left"])
            left, right, leaf = np.asarray(t["left"]), np.asarray(t["right"]), np.asarray(t["is_leaf"], dtype=bool)
            node = np.zeros(len(X), dtype=np.int64)
            while not leaf[node].all():
                inner = ~leaf[node]
                n, r = node[inner], rows[inner]
                x = X[r, feat[n]]
                go_left = np.where(np.isnan(x), miss[n].astype(bool), x <= thr[n])
                node[inner] = np.where(go_left, left[n], right[n])
            out += np.asarray(t["value"])[node]
        return out

    def dump(self, model):
        return json.dumps(model)

    def load(self, text):
        return json.loads(text)


class LightGBM(Learner):
    name, suffix = "lightgbm", ".txt"

    def fit(self, X, y, rounds, seed, curve=None):
        import lightgbm as lgb

        params = dict(objective="binary", learning_rate=SHAPE["learning_rate"], num_leaves=SHAPE["leaves"],
                      min_data_in_leaf=_min_leaf(len(X)), lambda_l2=SHAPE["l2"], seed=seed, deterministic=True,
                      force_row_wise=True, num_threads=0, verbose=-1,
                      monotone_constraints=_monotone(X), metric="binary_logloss")
        res = {}
        sets = dict(valid_sets=[lgb.Dataset(curve[0], curve[1])], valid_names=["curve"],
                    callbacks=[lgb.record_evaluation(res)]) if curve is not None else {}
        b = lgb.train(params, lgb.Dataset(X, y), num_boost_round=rounds, **sets)
        return b, (np.asarray(res["curve"]["binary_logloss"]) if curve is not None else None)

    def margin(self, model, X, rounds=None):
        return model.predict(np.asarray(X, dtype=np.float64), raw_score=True, num_iteration=rounds)

    def dump(self, model):
        return model.model_to_string()

    def load(self, text):
        import lightgbm as lgb

        return lgb.Booster(model_str=text)


class XGBoost(Learner):
    name = "xgboost"

    def fit(self, X, y, rounds, seed, curve=None):
        import xgboost as xgb

        params = dict(objective="binary:logistic", eta=SHAPE["learning_rate"], max_leaves=SHAPE["leaves"],
                      grow_policy="lossguide", tree_method="hist", min_child_weight=1.0, reg_lambda=SHAPE["l2"],
                      seed=seed, eval_metric="logloss",
                      monotone_constraints="(" + ",".join(map(str, _monotone(X))) + ")")
        res = {}
        evals = [(xgb.DMatrix(curve[0], label=curve[1]), "curve")] if curve is not None else []
        b = xgb.train(params, xgb.DMatrix(X, label=y), num_boost_round=rounds, evals=evals, evals_result=res,
                      verbose_eval=False)
        return b, (np.asarray(res["curve"]["logloss"]) if curve is not None else None)

    def margin(self, model, X, rounds=None):
        import xgboost as xgb

        rng = (0, rounds) if rounds else (0, 0)
        return model.predict(xgb.DMatrix(np.asarray(X, dtype=np.float64)), output_margin=True, iteration_range=rng)

    def dump(self, model):
        return bytes(model.save_raw(raw_format="json")).decode()

    def load(self, text):
        import xgboost as xgb

        b = xgb.Booster()
        b.load_model(bytearray(text.encode()))
        return b


class CatBoost(Learner):
    name = "catboost"

    def fit(self, X, y, rounds, seed, curve=None):
        import catboost

        m = catboost.CatBoost(dict(loss_function="Logloss", iterations=rounds, depth=2,
                                   learning_rate=SHAPE["learning_rate"], l2_leaf_reg=SHAPE["l2"], random_seed=seed,
                                   monotone_constraints=_monotone(X), verbose=False,
                                   allow_writing_files=False, use_best_model=False, thread_count=-1))
        m.fit(X, y, eval_set=(curve[0], curve[1]) if curve is not None else None)
        return m, (np.asarray(m.get_evals_result()["validation"]["Logloss"]) if curve is not None else None)

    def margin(self, model, X, rounds=None):
        return model.predict(np.asarray(X, dtype=np.float64), prediction_type="RawFormulaVal", ntree_end=rounds or 0)

    def dump(self, model):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model.save_model(os.path.join(d, "m.json"), format="json")
            return open(os.path.join(d, "m.json")).read()

    def load(self, text):
        import os
        import tempfile

        import catboost

        m = catboost.CatBoost()
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "m.json"), "w") as f:
                f.write(text)
            m.load_model(os.path.join(d, "m.json"), format="json")
        return m


class Logistic(Learner):
    """L2-penalised logistic regression on the standardised columns (a missing value: the column's median, and a
    0/1 column saying it was missing), saved as its coefficients; the image score's coefficient is kept >= 0."""

    name, rounds = "logistic", False

    def fit(self, X, y, rounds, seed, curve=None):
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        with warnings.catch_warnings():  # a column missing on every row: its median is 0
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nan_to_num(np.nanmedian(X, axis=0))
        flags = np.flatnonzero(np.isnan(X).any(0))
        Z = self._columns(dict(median=med.tolist(), flags=flags.tolist()), X)
        mean, sd = Z.mean(0), Z.std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        lr = LogisticRegression(C=1.0, max_iter=2000).fit((Z - mean) / sd, y)
        coef = lr.coef_.ravel()
        coef[X.shape[1] - 1] = max(coef[X.shape[1] - 1], 0.0)  # the image score never lowers the answer
        model = dict(median=med.tolist(), flags=flags.tolist(), mean=mean.tolist(), sd=sd.tolist(),
                     coef=coef.tolist(), intercept=float(lr.intercept_[0]))
        return model, (_log_loss_curve(curve[1], [self.margin(model, curve[0])]) if curve is not None else None)

    @staticmethod
    def _columns(model, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        missing = np.isnan(X)
        filled = np.where(missing, np.asarray(model["median"])[None, :], X)
        return np.c_[filled, missing[:, model["flags"]].astype(float)]

    def margin(self, model, X, rounds=None):
        Z = (self._columns(model, X) - np.asarray(model["mean"])) / np.asarray(model["sd"])
        return Z @ np.asarray(model["coef"]) + model["intercept"]

    def dump(self, model):
        return json.dumps(model)

    def load(self, text):
        return json.loads(text)


_KINDS = {k.name: k for k in (SklearnTrees, LightGBM, XGBoost, CatBoost, Logistic)}


def learner(name: str) -> Learner:
    """The learner called `name` (one of `LEARNERS`); one line naming the extra to install when its library is
    missing."""
    if name not in _KINDS:
        raise MelafastError(f"unknown stack model {name!r}: one of {', '.join(LEARNERS)}")
    if name in PACKAGES:
        import importlib.util

        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise MelafastError(f"--model {name} needs the {PACKAGES[name]} package: pip install 'melafast[boost]' "
                                f"(or pip install {PACKAGES[name]}); --model trees needs nothing more")
    return _KINDS[name]()

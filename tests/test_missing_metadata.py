"""Patients who come without metadata: the missing path trained on purpose (metadata dropout), scored, and said."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from fastai.callback.core import Callback
from typer.testing import CliRunner

from melafast.cli import app
from melafast.data import MetaDropout, MetaProcessor, TensorMeta, melanoma_dls

FIELDS = ["sex", "age_approx", "anatom_site_general_challenge"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _blanked(row, columns):
    return {**row, **{c: np.nan for c in columns}}


def _blanked_fields(proc, row, got) -> tuple | None:
    "Which fields, blanked as real holes, give the encoded row `got` (the fewest; None when no subset does)."
    from itertools import combinations

    for n in range(len(FIELDS) + 1):
        for cols in combinations(FIELDS, n):
            if torch.equal(got, torch.from_numpy(proc.encode_row(_blanked(row, cols)))):
                return cols
    return None


@pytest.mark.parametrize("patterns", ["subsets", "all_or_one"])
def test_dropout_blanks_fields_exactly_as_a_real_hole_is_encoded(sample_df, patterns):
    """A dropped row looks exactly like a row with real holes; `subsets` (the default) gives every pattern of missing
    fields, `all_or_one` (runs saved before it) every field or one."""
    from collections import Counter

    proc = MetaProcessor.fit(sample_df)
    rows = sample_df.to_dict("records") * 8
    x = TensorMeta(torch.from_numpy(proc.encode(pd.DataFrame(rows))))
    out = MetaDropout(proc, p=1.0, patterns=patterns)(x, split_idx=0)  # every row dropped
    seen, every = Counter(), 0
    for row, got in zip(rows, out):
        cols = _blanked_fields(proc, row, got)
        assert cols is not None, "a dropped row must look exactly like a row with real holes"
        missing = {c for c in FIELDS if pd.isna(row[c])}  # a field that was already a hole stays one
        seen[tuple(sorted(set(cols) | missing))] += 1
        if patterns == "all_or_one":  # every field, or one (which may have been a hole already)
            assert set(cols) | missing == set(FIELDS) or len(cols) <= 1, (row, cols)
            every += set(cols) | missing == set(FIELDS) and len(cols) > 1
    if patterns == "subsets":  # only age given, only sex missing, ...: every non-empty pattern is trained
        assert len([k for k in seen if k]) == 2 ** len(FIELDS) - 1, seen
    else:
        assert 0.3 < every / len(rows) < 0.7  # about half every field, half one
    assert torch.equal(MetaDropout(proc, p=1.0, patterns=patterns)(x, split_idx=1), x)  # validation: never touched
    # the share of rows touched follows p
    big = TensorMeta(x.repeat(10, 1))
    changed = (MetaDropout(proc, p=0.3, patterns=patterns)(big, split_idx=0) != big).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.03


def test_dropout_blanks_a_field_with_its_patient_features_and_routes_by_given_fields():
    "Patient-relative features are blanked with their field; n_images (from the table) is its own field and never "
    "makes a row count as one with patient metadata."
    df = pd.DataFrame({"sex": ["male", "female", None, "male"], "age_approx": [50.0, 60.0, 70.0, None],
                       "n_images": [2.0, 3.0, 1.0, 4.0], "size": [1.0, 2.0, 3.0, 4.0],
                       "size_patient_z": [0.1, 0.2, 0.3, 0.4], "size_patient_rank": [0.0, 0.5, 1.0, 0.5]})
    proc = MetaProcessor.fit(df, cat_names=["sex"], cont_names=["age_approx", "n_images", "size", "size_patient_z",
                                                                "size_patient_rank"])
    assert proc.given_columns == ["age_approx", "size", "sex"]
    assert sorted(map(sorted, proc.field_groups())) == [["age_approx"], ["n_images"], ["sex"],
                                                         ["size", "size_patient_rank", "size_patient_z"]]
    only_count = proc.encode(pd.DataFrame([{"n_images": 3.0}]))  # a patient id, nothing the user gives
    assert proc.no_metadata(torch.from_numpy(only_count)).tolist() == [True]
    assert proc.no_metadata(torch.from_numpy(proc.encode(df))).tolist() == [False] * 4
    x = TensorMeta(torch.from_numpy(proc.encode(df)).repeat(200, 1))
    out = MetaDropout(proc, p=1.0)(x, split_idx=0)
    slots = proc.slots()
    flag = {c: out[:, slots[c][1]] for c in proc.patient_columns}
    assert torch.equal(flag["size"], flag["size_patient_z"]) and torch.equal(flag["size"], flag["size_patient_rank"])
    assert not torch.equal(flag["size"], flag["n_images"])


def test_dataloaders_blank_training_batches_only(sample_df):
    dls = melanoma_dls(sample_df, fold=0, size=32, bs=32, num_workers=0, meta_dropout=0.5)
    proc = dls.meta_proc
    flags = [i for i, name in enumerate(proc.feature_names) if name.endswith("_missing")]
    torch.manual_seed(1)
    _, meta, _ = dls.train.new(shuffle=False).one_batch()
    train_rows = dls.train_ds.items.iloc[:32]
    clean = torch.from_numpy(proc.encode(train_rows))
    assert isinstance(meta, TensorMeta)
    changed = (meta != clean).any(1)
    assert 4 <= int(changed.sum()) <= 28 and (meta[changed][:, flags].sum(1) > clean[changed][:, flags].sum(1)).all()
    _, vmeta, _ = dls.valid.one_batch()
    assert torch.equal(vmeta.as_subclass(torch.Tensor),
                       torch.from_numpy(proc.encode(dls.valid_ds.items.iloc[: len(vmeta)])))
    assert dls.meta_dropout == 0.5
    with pytest.raises(Exception, match="meta_dropout must be in"):
        melanoma_dls(sample_df, fold=0, size=32, bs=8, num_workers=0, meta_dropout=1.0)


def test_cv_without_metadata_is_what_predict_gives_without_metadata(tiny_run, sample_dir):
    "results.json's second OOF AUC is the one a patient without metadata meets through `predict`."
    from melafast.data import load_competition
    from melafast.inference import load_predictor

    results = json.loads((tiny_run / "results.json").read_text())
    oof = pd.read_csv(tiny_run / "oof.csv")
    train = load_competition(sample_dir)[0].set_index("image_name")
    for k, rows in oof.groupby("fold"):
        images = train.loc[rows["image_name"]].reset_index().assign(**{c: np.nan for c in FIELDS})
        with pytest.warns(UserWarning, match=f"{len(rows)} of {len(rows)} images have no metadata"):
            pred = load_predictor(tiny_run / f"fold{k}").predict(images, num_workers=0, progress=False)
        assert np.allclose(pred, rows["pred_no_meta"], atol=1e-6)
        assert results["fold_aucs_no_meta"][str(k)] == pytest.approx(roc_auc_score(rows["target"], pred))
    assert results["oof_auc_no_meta"] == pytest.approx(roc_auc_score(oof["target"], oof["pred_no_meta"]))
    assert not np.allclose(oof["pred"], oof["pred_no_meta"], atol=1e-4)  # the metadata matters to this model


def test_predict_says_when_it_predicts_without_metadata(tiny_run, sample_dir, tmp_path):
    results = json.loads((tiny_run / "results.json").read_text())
    res = invoke("predict", "--run", tiny_run, "--images", sample_dir / "jpeg" / "test", "--out", tmp_path / "p.csv",
                 "--workers", 0)
    assert res.exit_code == 0, res.output
    assert "16 of 16 images have no metadata" in res.output and "missing-metadata path" in res.output
    assert f"{results['oof_auc_no_meta']:.4f}" in res.output and f"{results['oof_auc']:.4f}" in res.output
    res = invoke("predict", "--run", tiny_run, "--images", sample_dir / "jpeg" / "test", "--meta",
                 sample_dir / "test.csv", "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0 and "have no metadata" not in res.output


def test_a_metadata_csv_with_impossible_values_is_one_error_line(tiny_run, sample_dir, tmp_path):
    meta = pd.read_csv(sample_dir / "test.csv")
    for column, value, what in (("sex", "X", "cannot be a sex"), ("age_approx", "forty", "cannot be an age"),
                                ("age_approx", 250, "cannot be an age"), ("anatom_site_general_challenge", 3,
                                                                          "cannot be a body site")):
        bad = meta.astype({column: object})
        bad.loc[2, column] = value
        bad.to_csv(tmp_path / "bad.csv", index=False)
        res = invoke("predict", "--run", tiny_run, "--images", sample_dir / "jpeg" / "test", "--meta",
                     tmp_path / "bad.csv", "--out", tmp_path / "p.csv", "--workers", 0)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
        assert what in res.stderr and repr(value) in res.stderr and "row 4" in res.stderr and "bad.csv" in res.stderr
    holes = meta.astype({"sex": object})
    holes.loc[2, "sex"], holes.loc[3, "age_approx"] = "unknown", np.nan  # real holes are fine
    holes.to_csv(tmp_path / "holes.csv", index=False)
    res = invoke("predict", "--run", tiny_run, "--images", sample_dir / "jpeg" / "test", "--meta", tmp_path / "holes.csv",
                 "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output


def test_images_per_patient_is_unknown_without_a_patient_id(sample_dir):
    from melafast.data import add_meta_features, load_competition

    train = load_competition(sample_dir)[0]
    assert add_meta_features(train.drop(columns="patient_id"))["n_images"].isna().all()  # never 1 for everyone
    partly = add_meta_features(train.assign(patient_id=train["patient_id"].where(train.index % 2 == 0)))
    assert partly["n_images"][1::2].isna().all() and partly["n_images"][::2].notna().all()


def test_extra_meta_refuses_files_of_another_kind(sample_dir, make_run, tmp_path):
    "File sizes of 3x larger copies are far off those the model learned: a clear error, not a silent shift."
    from PIL import Image

    run = make_run(extra_meta=True, fold=0)  # shared with test_techniques
    files = json.loads((run / "fold0" / "config.json").read_text())["files"]
    assert files["median_side"] == 64 and files["prepared_size"] is None
    big = tmp_path / "big"
    big.mkdir()
    for f in sorted((sample_dir / "jpeg" / "test").iterdir()):
        Image.open(f).resize((192, 192)).save(big / f.name, quality=95)
    res = invoke("predict", "--run", run, "--images", big, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert "trained with --extra-meta on images of about 64 px" in res.stderr and "about 192 px" in res.stderr
    same = tmp_path / "same"
    shutil.copytree(sample_dir / "jpeg" / "test", same)
    res = invoke("predict", "--run", run, "--images", same, "--out", tmp_path / "p.csv", "--workers", 0)
    assert res.exit_code == 0, res.output


def test_rows_without_any_patient_field_take_the_image_head(sample_df):
    "A row with every patient field missing is scored from the image alone; a row missing some takes the joint head."
    from conftest import TINY_ARCH

    from melafast.model import MelanomaModel

    proc = MetaProcessor.fit(sample_df)
    flags = proc.patient_flags()
    assert [proc.feature_names[i] for i in flags] == [f"{c}_missing" for c in proc.patient_columns]
    torch.manual_seed(0)
    model = MelanomaModel(TINY_ARCH, n_meta=proc.n_features, pretrained=False, blank_flags=flags).eval()
    rows = sample_df.iloc[:6]
    meta = torch.from_numpy(proc.encode(rows))
    assert not (meta[:, flags] > 0.5).all(1).any()  # the sample's rows have some metadata
    none = torch.from_numpy(proc.encode(rows.assign(**{c: np.nan for c in FIELDS})))  # real holes everywhere
    some = proc.blank(meta, ["sex", "age_approx"])  # one field left
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        feats = model.image_features(x)
        alone = model.image_head(feats)

        def joint(m):
            return model.head(torch.cat([feats, model.meta_mlp(m)], dim=1))

        assert torch.allclose(model(x, none), alone, atol=1e-6)
        assert torch.allclose(model(x, proc.blank(meta)), alone, atol=1e-6)  # what dropout and predict's blank write
        assert torch.allclose(model(x, meta), joint(meta), atol=1e-6)
        # a row that had only sex and age is now without any field; the others keep their site
        bare = (some[:, flags] > 0.5).all(1)
        assert 0 < int(bare.sum()) < 6 and bare.tolist() == rows["anatom_site_general_challenge"].isna().tolist()
        assert torch.allclose(model(x, some), torch.where(bare[:, None], alone, joint(some)), atol=1e-6)
        assert not torch.allclose(alone, joint(none), atol=1e-3)  # two heads, not one
        mixed = torch.where(torch.tensor([True, False] * 3)[:, None], none, meta)  # each row by its own path
        assert torch.allclose(model(x, mixed), torch.where(torch.tensor([True, False] * 3)[:, None], alone, joint(meta)),
                              atol=1e-6)
    # while training every row takes the joint head (the image head's logits go to ImageHeadLoss), and the joint
    # head's loss does not reach the backbone
    torch.manual_seed(0)
    model = MelanomaModel(TINY_ARCH, n_meta=proc.n_features, pretrained=False, blank_flags=flags, head_drop=0.0,
                          meta_drop=0.0, drop_samples=1).train()
    out = model(x, none)
    with torch.no_grad():
        feats = model.image_features(x)
        assert torch.allclose(out, model.head(torch.cat([feats, model.meta_mlp(none)], dim=1)), atol=1e-5)
        assert torch.allclose(model.image_logits, model.image_head(feats), atol=1e-5)
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.meta_mlp[0].weight.grad is not None
    model.image_logits.sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    # a model without flags (image-only, or saved before the image head) has no such head and keeps its config
    plain = MelanomaModel(TINY_ARCH, n_meta=proc.n_features, pretrained=False)
    assert plain.image_head is None and "blank_flags" not in plain.config
    assert MelanomaModel(TINY_ARCH, pretrained=False, blank_flags=flags).image_head is None
    with pytest.raises(Exception, match="outside the metadata vector"):
        MelanomaModel(TINY_ARCH, n_meta=4, pretrained=False, blank_flags=[1, 9])


class _HeadGrad(Callback):
    "The image head's gradient at every training batch."

    def before_fit(self):
        self.norms = []

    def after_backward(self):
        m = self.learn.model
        grads = [m.image_head.weight.grad, m.backbone.conv_stem.weight.grad]
        self.norms.append([0.0 if g is None else float(g.abs().sum()) for g in grads])


@pytest.mark.parametrize("with_loss", [True, False])
def test_the_image_head_learns_from_every_training_row(sample_df, with_loss):
    """Only `ImageHeadLoss` trains the image head and, through it, the backbone: with it every batch gives both a
    gradient; without it, neither gets one (the joint head fuses onto the image features without training them)."""
    from conftest import TINY_ARCH

    from melafast.train.learner import ImageHeadLoss, melanoma_learner

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=16, num_workers=0, meta_dropout=0.0)
    learn = melanoma_learner(dls, TINY_ARCH, pretrained=False)
    assert learn.model.image_head is not None and any(isinstance(cb, ImageHeadLoss) for cb in learn.cbs)
    if not with_loss:
        learn.remove_cb(learn.image_head_loss)
    grads = _HeadGrad()
    learn.unfreeze()
    learn.fit(1, lr=1e-3, cbs=[grads])
    assert len(grads.norms) == len(dls.train)
    if with_loss:
        assert all(head > 0 and backbone > 0 for head, backbone in grads.norms)
    else:
        assert all(head == 0 and backbone == 0 for head, backbone in grads.norms)
    assert learn.model.image_logits is None  # no graph kept alive after the batch
    # the image-only learner and --no-image-head have no image head
    assert melanoma_learner(dls, TINY_ARCH, pretrained=False, image_head=False).model.image_head is None
    assert melanoma_learner(dls, TINY_ARCH, meta=False, pretrained=False).model.image_head is None


def test_the_saved_run_scores_its_metadata_less_path_with_the_image_head(tiny_run):
    "The fold models of a run rebuild with the image head, its flags where the run's own metadata vector has them."
    from melafast.inference.checkpoint import load_model
    from melafast.config import TrainConfig

    for k in (0, 1):
        model, cfg = load_model(tiny_run / f"fold{k}")
        assert model.image_head is not None
        assert cfg["model"]["blank_flags"] == MetaProcessor.from_dict(cfg["meta_proc"]).patient_flags()
    assert json.loads((tiny_run / "config.json").read_text())["settings"]["image_head"] is True
    assert TrainConfig.from_saved({}).image_head is False  # a run saved before it trained without one


class _LossSeen(Callback):
    "Per training batch: the loss the recorder sees, the joint head's loss and the image head's loss."

    order = 70  # after ImageHeadLoss

    def before_fit(self):
        self.rows = []

    def after_pred(self):
        if self.training:
            m = self.learn.model
            self._joint = float(self.learn.loss_func(self.learn.pred, *self.learn.yb))
            self._image = float(self.learn.loss_func(m.image_logits.float(), *self.learn.yb))

    def after_loss(self):
        if self.training:
            self.rows.append((float(self.learn.loss), self._joint, self._image))


def test_lr_find_follows_the_image_heads_loss_and_fit_logs_the_joint_one(sample_df, tmp_path):
    "The backbone learns from the image head: lr_find chooses its rate on that head's loss; training logs the joint."
    from conftest import TINY_ARCH

    from melafast.train.learner import melanoma_learner

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=16, num_workers=0, meta_dropout=0.0)
    learn = melanoma_learner(dls, TINY_ARCH, pretrained=False, path=tmp_path, model_dir=".")
    seen = _LossSeen()
    learn.add_cb(seen)
    learn.lr_find(num_it=6, show_plot=False)
    assert len(seen.rows) >= 3
    assert all(abs(got - image) < 1e-5 and abs(image - joint) > 1e-4 for got, joint, image in seen.rows)
    learn.fit(1, lr=1e-3)
    assert seen.rows and all(abs(got - joint) < 1e-5 for got, joint, _ in seen.rows)


def test_without_metadata_a_model_predicts_what_the_image_only_model_of_its_seed_predicts(make_run, sample_dir):
    """The image side of a metadata model (backbone and image head) is trained exactly as an image-only model with the
    same seed and settings: same initialisation, augmentations, dropout masks, lr_find rate and gradients. So a
    patient without metadata gets the image-only model's score, out of fold and on new images."""
    from melafast.inference import load_predictor

    meta = make_run(lr="auto", fold=1, tta=2)  # shared with test_cli
    image = make_run(lr="auto", fold=1, tta=2, meta=False)
    lrs = [json.loads((run / "fold1" / "config.json").read_text())["lr"] for run in (meta, image)]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-6)  # lr_find chose the same rate
    m = pd.read_csv(meta / "oof.csv").set_index("image_name")
    i = pd.read_csv(image / "oof.csv").set_index("image_name").loc[m.index]
    assert np.abs(m["pred_no_meta"] - i["pred"]).max() < 1e-5
    assert np.abs(m["pred"] - i["pred"]).max() > 1e-3  # with its metadata it is another model
    results = [json.loads((run / "results.json").read_text()) for run in (meta, image)]
    assert results[0]["oof_auc_no_meta"] == pytest.approx(results[1]["oof_auc"], abs=1e-6)
    images = sample_dir / "jpeg" / "test"
    with pytest.warns(UserWarning, match="no metadata"):
        blank = load_predictor(meta).predict(images, num_workers=0, progress=False)
    assert np.abs(blank - load_predictor(image).predict(images, num_workers=0, progress=False)).max() < 1e-5


def test_the_metadata_side_leaves_the_global_random_stream_alone(sample_df):
    import copy
    import pickle

    from conftest import TINY_ARCH

    from melafast.model import MelanomaModel, SideDropout
    from melafast.data.side import SideGenerator

    def draws(fn):
        torch.manual_seed(0)
        fn()
        return torch.rand(4)

    x = torch.ones(8, 16)
    drop = SideDropout(0.5, SideGenerator(7)).train()
    assert torch.equal(draws(lambda: drop(x)), draws(lambda: None))
    masks = drop(x), drop(x)
    assert not torch.equal(*masks) and set(masks[0].unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(SideDropout(0.5, SideGenerator(7)).train()(x), SideDropout(0.5, SideGenerator(7)).train()(x))
    assert torch.equal(drop.eval()(x), x)
    proc = MetaProcessor.fit(sample_df)
    meta = TensorMeta(torch.from_numpy(proc.encode(sample_df)))
    assert torch.equal(draws(lambda: MetaDropout(proc, p=0.5)(meta, split_idx=0)), draws(lambda: None))
    # building a metadata model draws from the global generator what an image-only model draws, no more
    assert torch.equal(draws(lambda: MelanomaModel(TINY_ARCH, n_meta=proc.n_features, pretrained=False, blank_flags=[1])),
                       draws(lambda: MelanomaModel(TINY_ARCH, pretrained=False)))
    model = MelanomaModel(TINY_ARCH, n_meta=proc.n_features, pretrained=False, blank_flags=[1])
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # EMA copies, learn.export
        assert twin.side.seed == model.side.seed
        assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))


def test_dropout_reaches_few_field_patterns_for_any_number_of_columns():
    "With 40 declared columns, a dropped row keeps any number of its fields, 0 to 39, about equally often: a patient "
    "who brings three fields (serve's form on a 2024 run) is a pattern training shows, not one in a trillion."
    columns = [f"c{i}" for i in range(40)]
    df = pd.DataFrame(np.random.default_rng(0).normal(size=(50, 40)), columns=columns)
    proc = MetaProcessor.fit(df, cat_names=[], cont_names=columns)
    x = TensorMeta(torch.from_numpy(proc.encode(df)).repeat(80, 1))  # 4,000 rows
    out = MetaDropout(proc, p=1.0)(x, split_idx=0)
    kept = 40 - out[:, [proc.slots()[c][1] for c in columns]].sum(1).long()  # fields each row still has
    share = torch.bincount(kept, minlength=41).float() / len(kept)
    assert share[40] == 0 and torch.all((share[:40] > 0.01) & (share[:40] < 0.045)), share  # 1/40 each

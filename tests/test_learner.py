import math
import pickle

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from conftest import LITE0, TINY_ARCH, needs_lite0

from melafast import model as model_mod
from melafast.inference.predictor import load_predictor
from melafast.train.save import save_run
from melafast.errors import MelafastError, RunError, WeightsError
from melafast.train.learner import MelanomaAUC, melanoma_learner, resolve_precision
from melafast.model import create_backbone
from melafast.train.learner import dihedral_tta


@pytest.fixture
def learn(tiny_dls, tmp_path):
    # lr_find's temporary checkpoint goes to tmp_path, not a models/ folder in the working directory
    return melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False, path=tmp_path, model_dir=".")


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before, module):
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def test_freeze_trains_only_meta_and_heads(learn):
    learn.freeze()
    m = learn.model
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in [*m.meta_mlp.parameters(), *m.head.parameters(), *m.image_head.parameters()])
    bb, mlp, head, image = _snapshot(m.backbone), _snapshot(m.meta_mlp), _snapshot(m.head), _snapshot(m.image_head)
    learn.fit(1, lr=1e-2)
    assert _changed(bb, m.backbone) == set()
    assert _changed(head, m.head) == {"weight", "bias"} == _changed(image, m.image_head)
    assert _changed(mlp, m.meta_mlp)
    learn.unfreeze()
    assert all(p.requires_grad for p in m.parameters())
    bb = _snapshot(m.backbone)
    learn.fit(1, lr=1e-2)
    assert len(_changed(bb, m.backbone)) > 0.9 * len(bb)


def test_fine_tune_and_lr_find_are_finite(learn):
    sugg = learn.lr_find(show_plot=False)
    assert math.isfinite(sugg.valley) and sugg.valley > 0
    learn.fine_tune(1, base_lr=2e-3, freeze_epochs=1)
    losses = [v for row in learn.recorder.values for v in row[:2]]
    assert len(learn.recorder.values) == 1 and all(math.isfinite(v) for v in losses)
    auc = learn.recorder.values[-1][2]
    assert 0 <= auc <= 1


class _GroupLrs(Callback):
    "Learning rate of each parameter group at every training batch of the unfrozen phase."

    def before_fit(self):
        self.lrs = []

    def after_batch(self):
        if self.training and not self.opt.frozen_idx:
            self.lrs.append([h["lr"] for h in self.opt.hypers])


@pytest.mark.parametrize("lr_mult", [None, 10])
def test_fine_tune_gives_the_backbone_the_head_lr_unless_told(learn, lr_mult):
    cb = _GroupLrs()
    learn.fine_tune(1, base_lr=1e-3, freeze_epochs=1, cbs=cb, **({} if lr_mult is None else dict(lr_mult=lr_mult)))
    assert len(learn.opt.hypers) == 2 and len(cb.lrs) == len(learn.dls.train)
    ratios = [head / backbone for backbone, head in cb.lrs]
    assert ratios == pytest.approx([lr_mult or 1] * len(ratios))
    assert 0 < max(head for _, head in cb.lrs) <= 1e-3 / 2  # fine_tune's unfrozen phase peaks at base_lr / 2


def _rot_views(x):
    "The 8 dihedral images by another route: 4 rotations, each also mirrored."
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def test_dihedral_tta_equals_hand_computed_mean(learn):
    learn.model.eval()
    expected = []
    with torch.no_grad():
        for img, meta, _ in learn.dls.valid:
            views = [torch.softmax(learn.model(v, meta), -1) for v in _rot_views(img)]
            expected.append(torch.stack(views).mean(0))
    expected = torch.cat(expected)
    got = dihedral_tta(learn, n=8, progress=False)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(learn.dihedral_tta(n=8, progress=False), got)
    plain, _ = learn.get_preds()
    assert torch.allclose(dihedral_tta(learn, n=1, progress=False), plain, atol=1e-5)
    with torch.no_grad():
        two = torch.cat([(torch.softmax(learn.model(img, meta), -1) + torch.softmax(learn.model(img.flip(-1), meta), -1)) / 2
                         for img, meta, _ in learn.dls.valid])
    assert torch.allclose(dihedral_tta(learn, n=2, progress=False), two, atol=1e-6)
    with pytest.raises(MelafastError, match="--tta must be 1, 2, 4 or 8"):
        dihedral_tta(learn, n=3)


def test_save_load_round_trip_without_pickle(learn, tmp_path, monkeypatch):
    learn.fit(1, lr=1e-3)
    expected = dihedral_tta(learn, n=8, progress=False)[:, 1].numpy()
    save_run(learn, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]

    def no_pickle(*a, **k):
        raise AssertionError("pickle used on the load path")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    pred = load_predictor(tmp_path / "run")
    got = pred.predict(learn.dls.valid.dataset.items, tta=8, bs=8, progress=False)
    assert np.abs(got - expected).max() < 1e-5
    assert pred.config["arch"] == TINY_ARCH and pred.config["size"] == 32


def test_load_rejects_broken_run(learn, tmp_path):
    save_run(learn, tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(RunError, match="cannot read the weights"):
        load_predictor(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        load_predictor(tmp_path / "run")


def test_image_only_learner(sample_df):
    from melafast.data import melanoma_dls

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=16, meta=False, num_workers=0)
    learn = melanoma_learner(dls, TINY_ARCH, meta=False, pretrained=False)
    assert learn.model.meta_mlp is None
    learn.fit(1, lr=1e-3)
    assert dihedral_tta(learn, n=4, progress=False).shape == (len(dls.valid_ds), 2)
    with pytest.raises(MelafastError, match="no metadata"):
        melanoma_learner(dls, TINY_ARCH, meta=True, pretrained=False)


def test_metric_scores_the_melanoma_column():
    from sklearn.metrics import roc_auc_score

    class FakeLearn:
        pass
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.integers(0, 3, 200))
    logits = torch.tensor(rng.normal(size=(200, 3)), dtype=torch.float32) + 2 * torch.nn.functional.one_hot(y, 3)
    metric = MelanomaAUC(pos=1)
    metric.reset()
    fl = FakeLearn()
    fl.pred, fl.y = logits, y
    metric.accumulate(fl)
    probs = torch.softmax(logits, -1)
    assert metric.value == pytest.approx(roc_auc_score((y == 1).numpy(), probs[:, 1].numpy()))
    assert metric.value != pytest.approx(roc_auc_score((y == 2).numpy(), probs[:, 2].numpy()))


def test_precision_resolution():
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(MelafastError, match="needs a CUDA GPU"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(MelafastError, match="one of"):
        resolve_precision("fp8", "cpu")


def test_offline_pretrained_error_names_the_ways_out(monkeypatch):
    monkeypatch.setattr(model_mod, "_hub_unreachable", lambda *a, **k: "the hub does not answer")
    monkeypatch.setattr(model_mod, "_cached_hub_file", lambda arch: None)
    with pytest.raises(WeightsError) as e:
        create_backbone("efficientnet_b0", pretrained=True)
    assert "--weights FILE" in str(e.value) and "--no-pretrained" in str(e.value)
    assert "the hub does not answer" in str(e.value)


def test_unknown_arch_suggests_names():
    with pytest.raises(MelafastError, match="did you mean efficientnet_b3"):
        create_backbone("efficientnet_b33", pretrained=False)


@needs_lite0
def test_local_weights_are_loaded():
    from safetensors.torch import load_file

    file = load_file(str(LITE0))
    net = create_backbone("tf_efficientnet_lite0", weights=LITE0)
    state = net.state_dict()
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "bn2.running_var"):
        assert torch.equal(state[key], file[key].to(state[key].dtype))
    assert net.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


@needs_lite0
def test_weights_that_do_not_fit_the_arch():
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("tf_efficientnet_lite2", weights=LITE0)


def test_compile_option_compiles_the_backbone_in_place(tiny_dls, tmp_path):
    learn = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False, compile=True)
    assert learn.model.backbone._compiled_call_impl is not None  # forward goes through torch.compile
    assert learn.model.head._compiled_call_impl is None
    plain = melanoma_learner(tiny_dls, TINY_ARCH, pretrained=False)
    assert list(learn.model.state_dict()) == list(plain.model.state_dict())  # checkpoints stay loadable

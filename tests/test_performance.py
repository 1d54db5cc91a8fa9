"""Performance mechanics that a CPU can check: no host read-back per batch, no wasted validation warps, one image pass for every fold model."""

import pytest
import torch
from conftest import TINY_ARCH
from fastai.callback.core import Callback
from torch.overrides import TorchFunctionMode

from melafast.data import melanoma_dls
from melafast.data.transfer import AsyncToDevice, async_copies
from melafast.train.learner import melanoma_learner

# Tensor methods that copy a value back to the host: on a GPU each one waits for all queued work
_READS = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
          torch.Tensor.__format__, torch.Tensor.__bool__}


class _CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS or getattr(func, "__name__", "") in ("item", "cpu", "tolist", "numpy"):
            self.n += 1
        return func(*args, **(kwargs or {}))


class _ReadsInAfterBatch(Callback):
    "Counts host reads made by every other callback's after_batch (the Recorder, progress bar and metrics)."

    def __init__(self):
        self.mode, self.batches = _CountReads(), {True: 0, False: 0}
        self.reads = {True: 0, False: 0}

    def before_fit(self):
        cbs = sorted(self.learn.cbs, key=lambda c: c.order)
        first, last = cbs[0], cbs[-1]
        spy = self

        class Enter(Callback):
            order = first.order - 1

            def after_batch(self):
                spy.start = spy.mode.n
                spy.mode.__enter__()

        class Exit(Callback):
            order = last.order + 1

            def after_batch(self):
                spy.mode.__exit__(None, None, None)
                spy.reads[self.training] += spy.mode.n - spy.start
                spy.batches[self.training] += 1

        self.added = [Enter(), Exit()]
        self.learn.add_cbs(self.added)

    def after_fit(self):
        self.learn.remove_cbs(self.added)


def _reads(learn):
    spy = _ReadsInAfterBatch()
    learn.fit(1, 1e-3, cbs=spy)
    return spy


def test_melafast_reads_back_at_most_once_per_epoch_where_fastai_reads_every_batch(sample_df):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    dls = melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0)
    plain = Learner(dls, melanoma_learner(dls, TINY_ARCH, pretrained=False).model, loss_func=CrossEntropyLossFlat(),
                    metrics=[melanoma_learner(dls, TINY_ARCH, pretrained=False).metrics[0]])
    fastai_spy = _reads(plain)
    assert fastai_spy.batches[True] >= 8
    assert fastai_spy.reads[True] >= 2 * fastai_spy.batches[True]  # smoothed loss to the CPU + progress comment
    learn = melanoma_learner(dls, TINY_ARCH, pretrained=False)
    spy = _reads(learn)
    assert spy.batches == fastai_spy.batches
    assert spy.reads[True] <= 1  # the progress bar's comment, at most once a second
    assert spy.reads[False] == 0  # validation loss and AUC stay on the device until the epoch ends
    assert all(isinstance(v, float) for v in learn.recorder.losses)  # numbers again after the fit
    assert learn.recorder.values[-1][0] == pytest.approx(plain.recorder.values[-1][0], rel=0.5)


def test_validation_batches_are_not_resampled(sample_df):
    dls = melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0, aug="heavy")
    img, _, _ = dls.valid.one_batch()
    raw = torch.stack([dls.valid.after_item(dls.valid_ds[i])[0] for i in range(4)]).float() / 255
    assert torch.equal(img.as_subclass(torch.Tensor), raw)  # bit for bit: no identity warp
    train_img = dls.train.new(shuffle=False).one_batch()[0].as_subclass(torch.Tensor)
    train_raw = torch.stack([dls.train.after_item(dls.train_ds[i])[0] for i in range(4)]).float() / 255
    assert not torch.equal(train_img, train_raw)  # training batches are still augmented


def test_async_copies_move_batches_in_a_batch_transform(sample_df):
    plain = melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0, aug="light")
    dls = async_copies(melanoma_dls(sample_df, fold=0, size=32, bs=4, num_workers=0, aug="light"), "cpu")
    assert dls.device == torch.device("cpu") and all(dl.device is None for dl in dls.loaders)
    assert isinstance(dls.valid.after_batch.fs[0], AsyncToDevice)
    for a, b in zip(plain.valid.one_batch(), dls.valid.one_batch()):
        assert type(a) is type(b) and torch.equal(a, b)
    learn = melanoma_learner(dls, TINY_ARCH, pretrained=False)
    learn.fit(1, 1e-3)
    assert learn.dls.valid.new(bs=2).after_batch.fs[0].device == torch.device("cpu")
    # the inference DataLoader of predict/submit/pseudo takes the same path on GPUs
    from melafast.data import inference_dl
    from melafast.data.transfer import async_copy_dl

    test = sample_df.head(6)
    plain_dl = inference_dl(test, 32, plain.meta_proc, bs=4, num_workers=0, device="cpu")
    async_dl = async_copy_dl(inference_dl(test, 32, plain.meta_proc, bs=4, num_workers=0, device="cpu"), "cpu")
    assert async_dl.device is None
    for a, b in zip(plain_dl, async_dl):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fold_models_share_one_pass_over_the_images(sample_dir, tiny_run, monkeypatch):
    import numpy as np

    from melafast.data import images as data_mod
    from melafast.inference.predictor import load_predictor
    from melafast.data import inference_dl, load_competition
    from melafast.inference.checkpoint import model_dirs
    from melafast.inference.predict import predict_run
    from melafast.inference.loop import predict_probs

    run = tiny_run  # 2 fold models
    _, test = load_competition(sample_dir)
    opened = []
    real_call = data_mod.OpenImage.__call__
    monkeypatch.setattr(data_mod.OpenImage, "__call__", lambda self, fn: opened.append(fn) or real_call(self, fn))
    got = predict_run(run, test, tta=4, bs=8, num_workers=0, log=lambda *_: None)
    # two fold models, each image decoded once (+1: fastai decodes one item when it builds a DataLoader)
    assert len(opened) == len(test) + 1
    # the same numbers, one model at a time through the single-model path
    per_fold = []
    for d in model_dirs(run):
        p = load_predictor(d)
        dl = inference_dl(test, p.config["size"], p.meta_proc, bs=8, num_workers=0, device="cpu")
        per_fold.append(predict_probs(p.model, dl, n=4, progress=False)[:, p.config["pos"]].numpy())
    assert np.allclose(got, np.mean(per_fold, axis=0), atol=1e-6)

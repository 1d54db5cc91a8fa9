"""Throughput, side by side in one process: melafast vs a pure timm + torch loop, for training and inference.

Training. melafast: real JPEG files written at --size, decoded and augmented by melanoma_dls (metadata included),
trained by melanoma_learner with its default precision. Pure loop: the same timm backbone on random tensors
already on the device, AdamW, bf16 autocast + channels_last on a GPU (the ceiling).
Inference. melafast: dihedral TTA x8 over the same JPEGs through inference_dl, counted per original image.
Pure loop: forward passes on device tensors; its images/s divided by 8 is the TTA x8 ceiling. Prints one JSON object.

    python benchmarks/throughput.py --small                                       # CPU, seconds
    python benchmarks/throughput.py --arch efficientnet_b3 --size 384 --bs 64     # GPU, the figure we report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def pure_loop(arch, size, bs, steps, warmup, device) -> float:
    """Images/s of forward + backward + AdamW step on synthetic tensors (no data loading at all)."""
    import timm
    import torch

    cuda = device.type == "cuda"
    model = timm.create_model(arch, pretrained=False, num_classes=2).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {"foreach": True}))
    x = torch.rand(bs, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * bs / (time.perf_counter() - t0)


def pure_inference(arch, size, bs, steps, warmup, device) -> float:
    """Images/s of eval-mode forward passes on synthetic tensors."""
    import timm
    import torch

    cuda = device.type == "cuda"
    model = timm.create_model(arch, pretrained=False, num_classes=2).to(device).eval()
    x = torch.rand(bs, 3, size, size, device=device)
    if cuda:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for _ in range(warmup):
            model(x).softmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x).softmax(-1)
        _sync(device)
    return steps * bs / (time.perf_counter() - t0)


def melafast_tta(learn, df, size, bs, workers, device) -> float:
    """Original images per second of dihedral TTA x8 over `df`'s JPEGs (second pass; the first warms up), and how
    many images were predicted."""
    from melafast.data import inference_dl
    from melafast.train.learner import dihedral_tta

    dl = inference_dl(df, size, learn.dls.meta_proc, bs=bs, num_workers=workers, device=device)
    dihedral_tta(learn, dl, n=8, progress=False)
    _sync(device)
    t0 = time.perf_counter()
    probs = dihedral_tta(learn, dl, n=8, progress=False)
    _sync(device)
    return len(probs) / (time.perf_counter() - t0), len(probs)


def melafast_epoch(arch, size, bs, n_images, workers, device, tmp, compile=False) -> dict:
    """Images/s of the training phase of a melafast epoch (the second one: the first warms up workers and kernels),
    then of TTA x8 inference with the trained Learner."""
    import numpy as np
    from fastai.callback.core import Callback

    from melafast.data import load_competition, make_sample, melanoma_dls
    from melafast.train.learner import melanoma_learner

    n_valid = bs
    data = make_sample(os.path.join(tmp, "data"), n_train=n_images + n_valid, n_test=1, px=size, seed=0)
    df, _ = load_competition(data)
    df["fold"] = np.r_[np.zeros(n_images, int), np.ones(n_valid, int)]

    class TrainTimer(Callback):
        "Seconds of the training phase and the images its batches held."

        def before_train(self):
            _sync(device)
            self.t0, self.images = time.perf_counter(), 0

        def after_batch(self):
            if self.training:
                self.images += len(self.y)

        def after_train(self):
            _sync(device)
            self.seconds = time.perf_counter() - self.t0

    dls = melanoma_dls(df, fold=1, size=size, bs=bs, num_workers=workers, device=device)
    learn = melanoma_learner(dls, arch, pretrained=False, compile=compile)
    timer = TrainTimer()
    learn.unfreeze()
    with learn.no_logging():  # the progress bar stays, as in `melafast train`
        learn.fit(1, 1e-4)  # warm-up
        learn.fit(1, 1e-4, cbs=timer)
    tta, tta_images = melafast_tta(learn, df, size, bs, workers, device)
    return dict(img_s=timer.images / timer.seconds, precision=learn.precision, images=timer.images, tta8_img_s=tta,
                tta_images=tta_images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_b3")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--images", type=int, default=1280, help="training images in the timed melafast epoch")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the pure loop")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--compile", action="store_true", help="torch.compile melafast's backbone (the pure loop stays eager)")
    p.add_argument("--small", action="store_true", help="tiny CPU-sized settings: checks the script, not the speed")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.arch, a.size, a.bs, a.images, a.steps, a.workers = "mobilenetv3_small_050", 64, 16, 64, 4, min(a.workers, 2)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        mf = melafast_epoch(a.arch, a.size, a.bs, a.images, a.workers, device, tmp, compile=a.compile)
    pure = pure_loop(a.arch, a.size, a.bs, a.steps, warmup=3 if a.small else 10, device=device)
    infer = pure_inference(a.arch, a.size, a.bs, a.steps, warmup=3 if a.small else 10, device=device)
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
               arch=a.arch, size=a.size, bs=a.bs, workers=a.workers, melafast_precision=mf["precision"], compile=a.compile,
               melafast_train_img_s=round(mf["img_s"], 1), pure_loop_img_s=round(pure, 1),
               ratio=round(mf["img_s"] / pure, 3), melafast_tta8_img_s=round(mf["tta8_img_s"], 1),
               pure_inference_img_s=round(infer, 1), tta8_ratio=round(mf["tta8_img_s"] / (infer / 8), 3),
               melafast_images_timed=mf["images"], melafast_tta_images=mf["tta_images"], pure_steps_timed=a.steps,
               torch=torch.__version__)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""fastai's interpretation calls for image + metadata batches.

`ClassificationInterpretation.from_learner(learn)` works on a melafast learner as it is (confusion matrix, top
losses). `interp.plot_top_losses(k)` dispatches on the type of the batch's input, and fastai knows single images only;
with metadata the input is a tuple (image, metadata vector). This adds that case: each image with its prediction,
label, loss and melanoma probability, and its decoded metadata when the learner has one. Importing melafast's
learner registers it.
"""

from __future__ import annotations

from fastai.interpret import plot_top_losses
from fastai.torch_core import TensorCategory
from fastai.vision.data import get_grid

__all__ = ["plot_top_losses"]


@plot_top_losses.dispatch
def plot_top_losses(x: tuple, y: TensorCategory, samples, outs, raws, losses, nrows=None, ncols=None, figsize=None,
                    **kwargs):
    axs = get_grid(len(samples), nrows=nrows, ncols=ncols, figsize=figsize,
                   title="prediction / actual / loss / probability")
    for ax, s, o, r, loss in zip(axs, samples, outs, raws, losses):
        s[0].show(ctx=ax, **kwargs)  # the image; s[1] is the metadata vector, s[-1] the label
        ax.set_title(f"{o[0]} / {s[-1]} / {loss.item():.2f} / {r.max().item():.2f}")

"""Training: a fastai Learner over the melanoma model, one fold at a time, into a run folder.

One concern a file, each importing only the ones above it (and the data, model, inference and evaluate layers):

    interpret    fastai's plot_top_losses for (image, metadata) batches
    hostsync     keep the host from waiting on the GPU: losses and the bar read once per epoch
    distributed  data-parallel training under torchrun or accelerate
    averaging    weight EMA and SWA
    learner      melanoma_learner: splitter, AUC metric, mixed precision, learn.dihedral_tta
    save         a model folder written (safetensors + config.json)
    fold         one fold: learner, schedule, kept epoch, out-of-fold predictions
    run          a whole run: folds, results.json, plots; lr_find, resume
    pseudo       pseudo-labels for `train --pseudo`

Import what you use from its module (`melafast.train.learner`); the top-level `melafast` names are the public API.
"""

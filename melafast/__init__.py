"""melafast: melanoma detection from dermoscopic images and patient metadata, on fastai and timm.

Public names are imported lazily so that `melafast --help` does not pay for importing torch and fastai.
"""

import warnings as _warnings

__version__ = "0.1.0"

# Two third-party warnings that every melafast user would otherwise see on import, and can do nothing about:
# torch deprecating the torch.jit.script that fastai calls, and tqdm's notebook bars without ipywidgets.
_warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
_warnings.filterwarnings("ignore", message="IProgress not found")

_EXPORTS = {
    "MelafastError": "errors", "DataError": "errors", "WeightsError": "errors", "RunError": "errors",
    "load_competition": "data", "clean_metadata": "data", "make_folds": "data", "MetaProcessor": "data",
    "melanoma_dls": "data", "inference_dl": "data", "make_sample": "data", "find_dataset": "data",
    "load_split": "data", "image_table": "data", "image_folder": "data",
    "MelanomaModel": "model", "melanoma_splitter": "model", "create_backbone": "model",
    "melanoma_learner": "train.learner", "MelanomaLearner": "train.learner", "MelanomaAUC": "train.learner", "melanoma_probs": "train.learner",
    "dihedral_tta": "train.learner", "dihedral_views": "inference.tta",
    "pseudo_labels": "train.pseudo", "SoftTargetCrossEntropy": "train.learner", "WeightEMA": "train.averaging",
    "save_run": "train.save", "save_model": "train.save", "load_model": "inference.checkpoint",
    "load_predictor": "inference", "Predictor": "inference", "RunPredictor": "inference", "RunFolder": "runfolder",
    "MissingMetadataWarning": "inference", "MetaDropout": "data", "ImageHeadLoss": "train.learner", "compare_runs": "evaluate.compare",
    "run_report": "evaluate.report", "evaluate_run": "evaluate.external", "recalibrate_run": "evaluate.recalibrate",
    "audit_run": "evaluate.audit", "shortcut_audit": "evaluate.audit", "save_operating_point": "evaluate.operating",
    "operating_table": "evaluate.operating", "calibrate_operating_point": "evaluate.calibrate", "model_card": "evaluate.card", "export_run": "deploy.export", "stack_run": "inference.stack",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'melafast' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"melafast.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__

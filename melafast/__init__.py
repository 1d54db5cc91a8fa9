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
    "melanoma_learner": "learner", "MelanomaLearner": "learner", "MelanomaAUC": "learner", "melanoma_probs": "learner",
    "dihedral_tta": "tta", "dihedral_views": "tta",
    "pseudo_labels": "pseudo", "SoftTargetCrossEntropy": "learner", "WeightEMA": "averaging",
    "save_run": "checkpoint", "save_model": "checkpoint", "load_model": "checkpoint",
    "load_predictor": "inference", "Predictor": "inference", "RunPredictor": "inference", "RunFolder": "runfolder",
    "MissingMetadataWarning": "inference", "MetaDropout": "data", "ImageHeadLoss": "learner", "compare_runs": "compare",
    "run_report": "report",
    "audit_run": "audit", "shortcut_audit": "audit", "save_operating_point": "operating",
    "operating_table": "operating", "calibrate_operating_point": "operating", "model_card": "card", "export_run": "export", "stack_run": "stack",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'melafast' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"melafast.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__

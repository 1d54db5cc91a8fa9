"""The data layer: competition tables and their images in, fastai DataLoaders of `(image, metadata), target` out.

One concern a file, each importing only the ones above it:

    store     images in one HDF5 file per split (`melafast prepare --store`), read like files
    columns   the metadata columns: sex, age, site cleaned to one spelling; declared columns checked for leaks
    tables    read train.csv / test.csv and find their images (load_competition, load_split, image_table)
    images    check that image files are usable; open them as RGB, decoding large JPEGs at reduced scale
    prepare   `melafast prepare`: a dataset resized once (files or a store), with its prepare.json
    folds     patient-grouped stratified folds (or by any column); external and pseudo-labelled rows that only train
    signatures  what each image's pixels say, cached: a perceptual hash (near-duplicates) and the skin tone (ITA)
    side      random numbers of the metadata side of training
    features  patient-relative features and the 2020 winners' extras (images per patient, log file size)
    meta      the metadata vector (MetaProcessor), fitted on training rows only; metadata dropout
    transfer  batches copied to the device without making the host wait
    blocks    fastai blocks and augmentations; melanoma_dls for training, inference_dl for prediction
    sample    the synthetic samples (2020 and 2024 layouts)
    kaggle    the Kaggle CLI: download a competition, upload a submission
"""

from .columns import CAT_NAMES, CONT_NAMES, clean_columns, clean_metadata, resolve_columns
from .tables import (IMAGE_EXTS, find_dataset, find_image_dir, image_folder, image_table, load_competition, load_split,
                     read_table)
from .images import check_images
from .folds import add_external, add_pseudo, check_teacher_folds, make_folds, pseudo_for_fold, read_pseudo
from .features import (EXTRA_CONT_NAMES, FILE_FEATURES, add_meta_features, add_patient_features, check_file_features,
                       file_reference, patient_feature_names)
from .meta import MetaDropout, MetaProcessor, MetaStack, TensorMeta
from .blocks import (SoftLabel, TensorSoftLabel, TrainOnly, default_batch_tfms, default_item_tfms,
                     diagnosis_labels, inference_dl, melanoma_dls)
from .sample import make_sample, make_sample_2024

__all__ = ["IMAGE_EXTS", "CAT_NAMES", "CONT_NAMES", "load_competition", "load_split", "image_folder", "image_table",
           "read_table", "clean_metadata", "find_image_dir", "make_folds", "MetaProcessor", "TensorMeta",
           "melanoma_dls", "inference_dl", "default_item_tfms", "default_batch_tfms", "make_sample", "find_dataset",
           "check_images", "diagnosis_labels", "add_external", "add_meta_features", "EXTRA_CONT_NAMES", "add_pseudo",
           "read_pseudo", "SoftLabel", "TensorSoftLabel", "MetaStack", "TrainOnly", "FILE_FEATURES", "MetaDropout",
           "check_file_features", "file_reference", "pseudo_for_fold", "check_teacher_folds", "resolve_columns",
           "clean_columns", "make_sample_2024", "add_patient_features", "patient_feature_names"]

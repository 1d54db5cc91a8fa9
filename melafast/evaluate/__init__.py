"""Evaluation: the figures of a set of scored rows, computed once, and the pages that render them.

One concern a file, each importing only the ones above it (and the data, model and inference layers):

    figures      Evaluation: AUC and pAUC with patient-bootstrap intervals, sensitivity at specificity,
                 calibration, subgroups, operating-point figures; the one place a headline figure is computed
    operating    operating points: choose one on the out-of-fold rows, cross-fitted; decide with it
    calibrate    an operating point chosen on a calibration set, on predict's own scale
    explain      Grad-CAM and what the metadata adds
    plots        every figure drawn (matplotlib)
    pages        the HTML of every page: sections, tables, images, one style
    runview      a run folder read for its pages: out-of-fold rows with their metadata, fold models
    gallery      the worst errors, by diagnosis, each beside its Grad-CAM map
    audit        the shortcut audit (artefacts drawn on the images)
    report       the run's report page
    compare      runs compared on the rows they all scored
    card         the model card

Import what you use from its module (`melafast.evaluate.figures`); the top-level `melafast` names are the public API.
"""

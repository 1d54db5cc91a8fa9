"""Deployment: thin skins over `melafast.inference`, never a second encoder.

    export   a run's fold models as ONNX graphs with their TTA, metadata encoding and operating point
    service  a run loaded once: an upload checked, decoded and predicted as `predict` would
    serve    the local web page and JSON API over a service (HTTP only)

The runtime that predicts from an export is `melafast.onnx` (`python -m melafast.onnx`): numpy, Pillow and
onnxruntime only, importing nothing else from melafast, so it stays at the top where users run it.

The ONNX parts need the `[deploy]` extra (onnx, onnxruntime, onnxscript) and say so in one line without it.
"""

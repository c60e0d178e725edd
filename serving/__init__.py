"""Inference for qsmrim: the Ray Serve HTTP application (:mod:`serving.app`) and offline ``qsmrim predict``.

``serving.model`` (onnxruntime), ``serving.preprocess`` (NIfTI -> patches + radiomics through ``qsmrim``)
and ``serving.predict`` (BIDS derivatives) need no Ray; only ``serving.app`` and ``qsmrim serve`` import it.
"""

"""Inference for qsmrim: the Ray Serve HTTP application (:mod:`serving.app`) and offline ``qsmrim predict``.

``serving.model`` (onnxruntime), ``serving.preprocess`` (NIfTI -> patches + radiomics through ``qsmrim``),
``serving.predict`` (BIDS derivatives) and ``serving.config`` (``AppArgs``) need no Ray; only
``serving.app`` and the ``qsmrim serve`` command import it.
"""

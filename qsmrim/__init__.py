"""qsmrim: paramagnetic rim lesion detection on QSM (QSMRim-Net, Zhang et al.)."""

__version__ = "0.1.0"

__all__ = ["__version__"]

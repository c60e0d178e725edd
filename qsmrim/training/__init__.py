"""Training science: splits, augmentation, one-member and stacked fits, fold ensembles (no Ray, Dask or MLflow)."""

from qsmrim.training.augment import AugmentationConfig, TrainAugmentation
from qsmrim.training.config import TrainConfig
from qsmrim.training.dataset import LesionDataset
from qsmrim.training.fit import fit_member, predict_member, resolve_device
from qsmrim.training.fit_stack import fit_members, fit_stack
from qsmrim.training.member import Member, Standardisation
from qsmrim.training.splits import load_or_make_splits, make_splits

__all__ = [
    "AugmentationConfig",
    "TrainAugmentation",
    "TrainConfig",
    "LesionDataset",
    "fit_member",
    "fit_members",
    "fit_stack",
    "predict_member",
    "resolve_device",
    "Member",
    "Standardisation",
    "load_or_make_splits",
    "make_splits",
]

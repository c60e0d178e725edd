"""One allow-list from configuration names to model builders, and what each model needs.

Experiment configs choose a model by registry name plus keyword arguments (e.g. ``base_channels``);
the name fixes the architecture switches, the keyword arguments only size it. Unknown names fail
with the list of allowed ones. :data:`CAPABILITIES` declares, per name, whether the model is torch
(trained by the torch loop, exported to ONNX, may use a GPU), reads radiomic features, and can be
trained stacked; callers ask :func:`is_torch_model`, :func:`uses_radiomics` and :func:`is_stackable`
instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qsmrim.models.aprl_nn import APRLNN
from qsmrim.models.base import RimClassifier
from qsmrim.models.qsmrimnet import QSMRimNet
from qsmrim.models.rimnet import RimNet

__all__ = [
    "CAPABILITIES",
    "MODEL_NAMES",
    "STACKABLE_MODEL_NAMES",
    "TORCH_MODEL_NAMES",
    "ModelCapabilities",
    "build_model",
    "is_stackable",
    "is_torch_model",
    "uses_radiomics",
]

# The architecture switches each QSMRim-Net family name fixes (paper Table 3 and the add-fusion variant).
_QSMRIMNET_PRESETS: dict[str, dict[str, Any]] = {
    "qsmrimnet": {"image_fusion": "channel", "use_radiomics": True, "fusion": "concat", "oversample": True},
    "qsmrimnet-add": {"image_fusion": "channel", "use_radiomics": True, "fusion": "add", "oversample": True},
    "image-channel": {"image_fusion": "channel", "use_radiomics": False, "oversample": False},
    "image-rimnet": {"image_fusion": "stream", "use_radiomics": False, "oversample": False},
    "image-radiomics": {
        "image_fusion": "channel",
        "use_radiomics": True,
        "fusion": "concat",
        "oversample": False,
    },
}


def _build_aprl_rf(**kwargs: Any) -> Any:
    # scikit-learn / imbalanced-learn are only needed for this comparator.
    from qsmrim.models.aprl_rf import APRLRandomForest

    return APRLRandomForest(**kwargs)


def _preset_builder(name: str) -> Callable[..., nn.Module]:
    preset = _QSMRIMNET_PRESETS[name]

    def build(**kwargs: Any) -> QSMRimNet:
        fixed = sorted(set(kwargs) & set(preset))
        if fixed:
            raise TypeError(f"Model {name!r} fixes {fixed}; choose another registry name to change them")
        return QSMRimNet(**preset, **kwargs)

    return build


_BUILDERS: dict[str, Callable[..., Any]] = {
    **{name: _preset_builder(name) for name in _QSMRIMNET_PRESETS},
    "rimnet": RimNet,
    "aprl-nn": APRLNN,
    "aprl-rf": _build_aprl_rf,
}

#: Every registry name, in the order of the paper's tables.
MODEL_NAMES: tuple[str, ...] = (
    "qsmrimnet",
    "qsmrimnet-add",
    "image-channel",
    "image-rimnet",
    "image-radiomics",
    "rimnet",
    "aprl-rf",
    "aprl-nn",
)


@dataclass(frozen=True)
class ModelCapabilities:
    """What a registered model is and needs, known without building one."""

    is_torch: bool
    """Builds a :class:`~qsmrim.models.base.RimClassifier` (torch loop, ONNX export, GPU); else scikit-learn."""
    uses_radiomics: bool
    """Reads the 527 radiomic features (so a run must extract them)."""
    stackable: bool
    """Members can share one stacked training step (:class:`~qsmrim.models.stacked.MemberStack`): the
    QSMRim-Net family, whose image branch is a ResNet-18-3D."""
    uses_patch: bool = False
    """Reads the image patch (and so takes ``qsm_scale``, the factor on its QSM channel)."""


#: Every registry name's capabilities.
CAPABILITIES: dict[str, ModelCapabilities] = {
    **{
        name: ModelCapabilities(is_torch=True, uses_radiomics=bool(preset["use_radiomics"]), stackable=True,
                                uses_patch=True)
        for name, preset in _QSMRIMNET_PRESETS.items()
    },
    "rimnet": ModelCapabilities(is_torch=True, uses_radiomics=False, stackable=False, uses_patch=True),
    "aprl-rf": ModelCapabilities(is_torch=False, uses_radiomics=True, stackable=False),
    "aprl-nn": ModelCapabilities(is_torch=True, uses_radiomics=True, stackable=False),
}

#: The names that build a :class:`~qsmrim.models.base.RimClassifier` (trained by the torch loop, exported to ONNX).
TORCH_MODEL_NAMES: tuple[str, ...] = tuple(n for n in MODEL_NAMES if CAPABILITIES[n].is_torch)

#: The names whose members can be trained stacked (:class:`~qsmrim.models.stacked.MemberStack`): the
#: QSMRim-Net family, whose image branch is a ResNet-18-3D.
STACKABLE_MODEL_NAMES: tuple[str, ...] = tuple(n for n in MODEL_NAMES if CAPABILITIES[n].stackable)


def is_stackable(name: str) -> bool:
    """Whether members of ``name`` can share one stacked training step (grouped convolutions)."""
    _check_name(name)
    return CAPABILITIES[name].stackable


def uses_radiomics(name: str) -> bool:
    """Whether models registered as ``name`` read radiomic features (known without building one)."""
    _check_name(name)
    return CAPABILITIES[name].uses_radiomics


def is_torch_model(name: str) -> bool:
    """Whether ``name`` builds a torch :class:`~qsmrim.models.base.RimClassifier`."""
    _check_name(name)
    return CAPABILITIES[name].is_torch


def build_model(name: str, **kwargs: Any) -> RimClassifier | Any:
    """Build the model registered as ``name`` with constructor ``kwargs``.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    **kwargs
        Constructor arguments (e.g. ``base_channels=8``); names whose architecture switches are fixed
        by the registry name raise ``TypeError`` if given them.

    Returns
    -------
    RimClassifier or APRLRandomForest
        A torch model for every name in :data:`TORCH_MODEL_NAMES`, a scikit-learn estimator for
        ``"aprl-rf"``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the allowed names.

    Examples
    --------
    >>> build_model("qsmrimnet", base_channels=4).fusion
    'concat'
    """
    _check_name(name)
    return _BUILDERS[name](**kwargs)


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"Model name must be a string, one of {list(MODEL_NAMES)}, not {type(name).__name__}")
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; allowed names: {', '.join(MODEL_NAMES)}")

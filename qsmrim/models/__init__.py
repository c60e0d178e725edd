"""Networks and comparators of QSMRim-Net (paper sections 2.2, 2.4 and 2.6).

Every torch model is a :class:`RimClassifier`: ``model(patch, radiomics) -> logit [N]`` with
``patch float32 [N,2,16,32,32]`` and ``radiomics float32 [N,527]``, and
``model.forward_train(patch, radiomics, labels) -> (logits [M], labels [M])`` for the training step
(``M > N`` only when DeepSMOTE synthesises rim+ samples). Build models by name with
:func:`build_model`; export one to ONNX with :func:`qsmrim.export.export_onnx`, a run's ensemble with
:func:`qsmrim.export.export_ensemble`. This package imports neither onnxruntime nor any platform package.

:class:`APRLRandomForest` (scikit-learn) is loaded on first access, so importing this package needs
only torch and numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsmrim.models.aprl_nn import APRLNN
from qsmrim.models.base import N_RADIOMICS, PATCH_SHAPE, RimClassifier, example_inputs
from qsmrim.models.deepsmote import DeepSMOTE, SmoteDraw, deep_smote_interpolate
from qsmrim.models.layers import ACTIVATIONS, ClassifierHead, LinearBlock
from qsmrim.models.qsmrimnet import QSMRimNet
from qsmrim.models.radiomics_mlp import RadiomicsMLP
from qsmrim.models.registry import (
    MODEL_NAMES,
    STACKABLE_MODEL_NAMES,
    TORCH_MODEL_NAMES,
    build_model,
    is_stackable,
    is_torch_model,
    uses_radiomics,
)
from qsmrim.models.resnet3d import BasicBlock3D, ResNet3D, resnet18_3d
from qsmrim.models.rimnet import RimNet
from qsmrim.models.stacked import MemberStack, stack_networks, unstack_network

if TYPE_CHECKING:
    from qsmrim.models.aprl_rf import APRLRandomForest

__all__ = [
    "ACTIVATIONS",
    "APRLNN",
    "APRLRandomForest",
    "MODEL_NAMES",
    "N_RADIOMICS",
    "PATCH_SHAPE",
    "STACKABLE_MODEL_NAMES",
    "TORCH_MODEL_NAMES",
    "BasicBlock3D",
    "ClassifierHead",
    "DeepSMOTE",
    "LinearBlock",
    "MemberStack",
    "QSMRimNet",
    "RadiomicsMLP",
    "ResNet3D",
    "RimClassifier",
    "RimNet",
    "SmoteDraw",
    "build_model",
    "deep_smote_interpolate",
    "example_inputs",
    "is_stackable",
    "is_torch_model",
    "resnet18_3d",
    "stack_networks",
    "unstack_network",
    "uses_radiomics",
]


def __getattr__(name: str) -> Any:
    # Lazy: scikit-learn and imbalanced-learn are imported only when APRL(RF) is used.
    if name == "APRLRandomForest":
        from qsmrim.models.aprl_rf import APRLRandomForest

        return APRLRandomForest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Typed training configuration (the ``training:`` section of an experiment YAML)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from qsmrim.training.augment import AugmentationConfig

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How one ensemble member is fitted; defaults are the paper's (section 2.3).

    ``model`` is a registry name of :mod:`qsmrim.models` and ``model_kwargs`` its size knobs
    (e.g. ``{"base_channels": 8}`` for CI). ``bf16`` turns on bf16 autocast on GPU; it is off by default
    because at batch 64 the step is launch-bound and fp32 measured faster (bench/RESULTS.md).
    ``channels_last`` stores 3-D activations and convolution weights channels-last on GPU;
    ``cudnn_benchmark`` lets cuDNN time its convolution algorithms once per shape (the shapes are fixed).
    ``cuda_graphs`` replays the stacked backbones' forward and backward as CUDA graphs in stacked fits on
    GPU (full batches; fp32 only), which removes their kernel-launch cost.
    ``stack_on_cpu`` stacks members (grid trials, ``qsmrim train``) on a CPU too, where it is slower
    (:func:`~qsmrim.training.fit_stack.stacking_pays`; tests use it to run the stacked path).
    ``inner_val_fraction`` of the training fold's subjects is held
    out to choose the honest threshold without the test fold (0 disables the honest variant).

    ``min_steps`` makes the recipe scale with the cohort: a member takes at least that many optimizer steps,
    the epochs being raised for small cohorts (:meth:`for_cohort`; the milestones stay fractions of the
    raised count). The paper's 40 epochs of batch 64 on ~2,660 fitted lesions are ~1,700 steps; a 16-subject
    cohort at 4 epochs takes ~20, too few for QSMRim-Net to learn (bench/RESULTS.md, issue 14). 0 keeps
    ``epochs`` as written.
    """

    model: str = "qsmrimnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.7, 0.9)
    gamma: float = 0.1
    weight_decay: float = 0.0
    bf16: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = True
    cuda_graphs: bool = True
    device: str = "auto"
    eval_batch_size: int = 256
    inner_val_fraction: float = 0.2
    checkpoint_every: int = 1
    n_folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    split_seed: int = 0
    min_steps: int = 0
    stack_on_cpu: bool = False
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, not {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm), not {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, not {self.lr}")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1], not {self.milestones}")
        if not 0 <= self.inner_val_fraction < 1:
            raise ValueError(f"inner_val_fraction must be in [0, 1), not {self.inner_val_fraction}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, not {self.n_folds}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, not {self.min_steps}")

    def steps_per_epoch(self, n_labelled: int) -> int:
        """Optimizer steps of one epoch for a member of a cohort with ``n_labelled`` lesions: the rows of a
        training fold less its inner validation share, in batches (an estimate from the cohort, the same for
        every fold, so members trained alone and stacked agree on their epochs)."""
        n_fit = n_labelled * (1 - 1 / self.n_folds) * (1 - self.inner_val_fraction)
        return max(1, math.ceil(n_fit / self.batch_size))

    def for_cohort(self, n_labelled: int) -> TrainConfig:
        """This config with ``epochs`` raised so that a member takes at least ``min_steps`` steps on a cohort
        of ``n_labelled`` labelled lesions (itself when ``min_steps`` is 0 or already met)."""
        if self.min_steps <= 0:
            return self
        epochs = max(self.epochs, math.ceil(self.min_steps / self.steps_per_epoch(n_labelled)))
        return self if epochs == self.epochs else dataclasses.replace(self, epochs=epochs)

    def milestone_epochs(self) -> list[int]:
        """Epochs at which the learning rate drops (50/70/90% of the epochs by default)."""
        return sorted({max(1, round(m * self.epochs)) for m in self.milestones})

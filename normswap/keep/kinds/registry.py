"""The registry of output kinds and the :class:`Kind` interface each one implements (torch-free)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

#: every ``--output-kind`` value (torch-free)
KIND_NAMES = ("logits", "probabilities", "multilabel", "peaked", "regression", "dense")

#: probabilities are clamped to [EPS, 1 − EPS] before their logarithm / logit
EPS = 1e-6
#: top-1 "within ±k bins" is reported with this k for every output with a class or bin axis
WITHIN_BINS = 1
#: a peaked row's position is the output-weighted mean bin index over ±PEAK_HALF_WIDTH bins around its argmax
PEAK_HALF_WIDTH = 4
#: a sigmoid output is *peaked* when it has at least this many bins ...
PEAKED_MIN_BINS = 16
#: ... and the median row holds at least this fraction of its mass within ±PEAK_HALF_WIDTH bins of its argmax
PEAKED_MASS = 0.6

_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (by its ``name``); returns it."""
    _REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The registered kind ``name``; an :class:`~normswap.errors.InputError` naming the choices otherwise."""
    from ...errors import InputError

    if name not in _REGISTRY:
        raise InputError(f"--output-kind {name!r} is not an output kind; choose from: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_name(name: str | None) -> None:
    """Torch-free validation of an ``--output-kind`` value (None = detect)."""
    from ...errors import InputError

    if name is not None and name not in KIND_NAMES:
        raise InputError(f"--output-kind {name!r} is not an output kind; choose from: {', '.join(KIND_NAMES)}")


class Kind(ABC):
    """One output kind: its loss, its measures (accumulated by a :class:`Meter`), its ground truth."""

    name = ""
    #: the measure keys, the primary (the kind's quality, higher is better) first
    measures: tuple[str, ...] = ()
    #: how each measure reads in a table / a sentence
    labels: dict[str, str] = {}
    #: what the ground-truth measure is called (``accuracy`` for a classifier)
    truth_label = "accuracy"
    #: the ground-truth measure is a proportion of samples (it gets a Wilson interval over the sample count)
    truth_proportion = True
    #: the measures that are proportions (they get a Wilson interval over the sample count)
    proportions: tuple[str, ...] = ()
    #: a row's argmax is what a user reads (a class, a bin): the verdict quotes top-1 agreement beside the
    #: primary. False for independent labels, whose argmax means nothing.
    argmax_is_read = True
    #: recovery's augmentation may mix pairs of inputs (mixup; the original labels each mixture). False
    #: for a kind where that was measured to cost the student its function (:class:`~.heads.Regression`).
    mixup = True

    @property
    def primary(self) -> str:
        return self.measures[0]

    @abstractmethod
    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        """The distillation loss of each sample ``[N]`` (student ``s``, original ``t``, differentiable in ``s``)."""
        ...

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        """The distillation loss of the batch: the mean of :meth:`sample_losses`."""
        return self.sample_losses(s, t, temperature).mean()

    @abstractmethod
    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        """This batch's float64 sums (named tensors) from which :meth:`values` computes the measures."""
        ...

    @abstractmethod
    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        ...

    @abstractmethod
    def truth(self, pred: Any, y: Any) -> float:
        """The model's ground-truth measure on labelled data (``pred``: its outputs, ``y``: the labels)."""
        ...

    def __repr__(self) -> str:
        return f"<output kind {self.name}>"

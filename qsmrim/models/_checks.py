"""Constructor argument checks for the networks in :mod:`qsmrim.models`.

Networks validate in ``__init__`` (MONAI / TorchIO style): a wrong type raises ``TypeError``, a wrong
value ``ValueError``, and the message names the argument, what is allowed and what was received.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value}")
    return value


def check_probability(value: object, name: str) -> float:
    """Return ``value`` if it is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in [0, 1), not {type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), not {value}")
    return float(value)


def check_choice(value: object, name: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of the ``allowed`` strings."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(allowed)}, not {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, not {value!r}")
    return value


def check_int_tuple(value: object, name: str, length: int, *, minimum: int = 1) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ``length`` ints >= ``minimum``; a single int is repeated."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * length
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a sequence of {length} ints, not {type(value).__name__}")
    items = tuple(value)
    if len(items) != length or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"{name} must be {length} integers, not {items!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must hold integers >= {minimum}, not {items!r}")
    return items


def check_int_sequence(value: object, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Return ``value`` as a non-empty tuple of ints >= ``minimum``."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of integers, not {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of integers, not {tuple(value)!r}")
    return check_int_tuple(value, name, len(value), minimum=minimum)

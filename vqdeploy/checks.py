"""Argument checks shared across the package (the ground floor: imports nothing of vqdeploy)."""

from __future__ import annotations

import math

import torch


def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """A finite Python number in [low, high] ((low, high] with ``low_open``): options are fixed at trace time."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value}")

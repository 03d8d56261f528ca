"""Gradient strategies: how one training iteration turns a batch into parameter gradients."""

from __future__ import annotations

import inspect

from app.strategies.base import GradientStrategy, StepResult, random_submasks, subset_loss
from app.strategies.basic import DropoutStrategy, PlainStrategy
from app.strategies.cggm import CGGMStrategy
from app.strategies.gmd import GMDApproxStrategy, GMDStrategy
from app.strategies.predict import PredictStrategy

__all__ = [
    "GradientStrategy", "StepResult", "subset_loss", "random_submasks", "PlainStrategy", "DropoutStrategy",
    "GMDStrategy", "GMDApproxStrategy", "CGGMStrategy", "PredictStrategy", "STRATEGIES", "build_strategy",
]

STRATEGIES: dict[str, type[GradientStrategy]] = {
    cls.name: cls for cls in (PlainStrategy, DropoutStrategy, GMDStrategy, GMDApproxStrategy, CGGMStrategy, PredictStrategy)
}


def build_strategy(name: str, **kwargs) -> GradientStrategy:
    """Instantiate a strategy by name, passing only the options it accepts.

    Raises:
        ValueError: naming the known strategies when ``name`` is not one of them.
    """
    key = str(name).strip().lower()
    if key not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}: choose one of {sorted(STRATEGIES)} (--strategy NAME).")
    cls = STRATEGIES[key]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in params})

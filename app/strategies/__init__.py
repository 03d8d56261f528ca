"""Gradient strategies: how one training iteration turns a batch into parameter gradients."""

from __future__ import annotations

import difflib
import inspect

from app.strategies.base import GradientStrategy, StepResult, random_submasks, subset_loss
from app.strategies.basic import DropoutStrategy, PlainStrategy
from app.strategies.cggm import CGGMStrategy
from app.strategies.gmd import GMDApproxStrategy, GMDStrategy
from app.strategies.predict import PredictStrategy

__all__ = [
    "GradientStrategy", "StepResult", "subset_loss", "random_submasks", "PlainStrategy", "DropoutStrategy",
    "GMDStrategy", "GMDApproxStrategy", "CGGMStrategy", "PredictStrategy", "STRATEGIES", "build_strategy",
    "strategy_options",
]

STRATEGIES: dict[str, type[GradientStrategy]] = {
    cls.name: cls for cls in (PlainStrategy, DropoutStrategy, GMDStrategy, GMDApproxStrategy, CGGMStrategy, PredictStrategy)
}


def strategy_options() -> set[str]:
    """Every option that some registered strategy's constructor takes (``subsets``, ``rho``, ...)."""
    options: set[str] = set()
    for cls in STRATEGIES.values():
        for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                options.add(param.name)
    return options


def build_strategy(name: str, **kwargs) -> GradientStrategy:
    """Instantiate a strategy by name, passing only the options it accepts.

    The bundles hand every strategy's knobs to this one factory (``strategy_def``), so an option of
    another strategy (``rho`` when training ``gmd``) is left out without a word. An option that no
    strategy takes is refused: it is a misspelling (``--strategy_def#subset 5``) that would otherwise
    train with the default and leave no trace.

    Raises:
        ValueError: naming the known strategies when ``name`` is not one of them, or naming an option
            that no strategy takes and the options it resembles.
    """
    key = str(name).strip().lower()
    if key not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}: choose one of {sorted(STRATEGIES)} (--strategy NAME).")
    known = strategy_options()
    for option in sorted(set(kwargs) - known):
        close = difflib.get_close_matches(option, sorted(known), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"the options are {sorted(known)}."
        raise ValueError(f"{option!r} (strategy_def#{option} in the bundle config) is an option of no strategy: {hint} "
                         "Fix its name in the config or the --strategy_def#... override; the run would train with "
                         "the default.")
    cls = STRATEGIES[key]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in params})

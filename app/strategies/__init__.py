"""Gradient strategies: how one training iteration turns a batch into parameter gradients."""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from typing import Any

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

logger = logging.getLogger(__name__)

#: the bundles' setting of each strategy option whose name differs from it (``strategy_def#subsets: '@gmd_subsets'``)
BUNDLE_SETTINGS = {"subsets": "gmd_subsets", "rho": "cggm_rho", "head_lr": "cggm_head_lr", "b_clip": "cggm_b_clip",
                   "sync": "gmd_sync"}
#: the bundles' defaults of options whose constructor default differs (``diagnostics_interval: 20`` in both
#: ``train.yaml``, 0 in the strategies): the bundles pass them to every strategy, so only another value was set by
#: the user (tests/strategies/test_build.py checks them against the bundles)
BUNDLE_DEFAULTS = {"diagnostics_interval": 20}

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


def build_strategy(name: str, **kwargs: Any) -> GradientStrategy:
    """Instantiate a strategy by name, passing only the options it accepts.

    The bundles hand every strategy's knobs to this one factory (``strategy_def``), so an option of
    another strategy (``rho`` when training ``gmd``) is left out; a warning names it when it is set away from
    its default (``--gmd_subsets 3`` with ``--strategy plain``), since it then has no effect. An option that no
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
    _warn_unused(cls, {k: v for k, v in kwargs.items() if k not in params})
    return cls(**{k: v for k, v in kwargs.items() if k in params})


def _same(value: object, default: object) -> bool:
    """Whether an option's value is its default, as the command line or a YAML file may spell it."""
    if isinstance(value, str) and not isinstance(default, str):
        try:  # a number given as text ("1.20" from a YAML string) is compared as the number it is
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, str) or isinstance(default, str):
        return str(value).strip().lower() == str(default).strip().lower()
    if value is None or default is None:
        return value is default
    try:
        return math.isclose(float(value), float(default), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return value == default


def _warn_unused(cls: type[GradientStrategy], others: dict[str, object]) -> None:
    """Log each option set away from its default that belongs to other strategies than ``cls``.

    The bundles pass every strategy's options to :func:`build_strategy`, so ``--gmd_subsets 3`` with
    ``--strategy plain``, or a recipe's ``warmup_iterations`` (``predict``) under ``--strategy gmd``, trained
    as if it had not been given: the log says so, as it does for a setting the command does not use. The bundles'
    own default (:data:`BUNDLE_DEFAULTS`, ``diagnostics_interval`` 20) is a default too: ``--diagnostics_interval 5``
    with ``--strategy plain`` is named, the bundle's 20 is not.
    """
    for option, value in others.items():
        owners = [(name, inspect.signature(c.__init__).parameters.get(option)) for name, c in STRATEGIES.items()]
        owners = [(name, p) for name, p in owners if p is not None]
        if option in BUNDLE_DEFAULTS and _same(value, BUNDLE_DEFAULTS[option]):
            continue
        if not owners or all(p.default is not p.empty and _same(value, p.default) for _, p in owners):
            continue
        setting = BUNDLE_SETTINGS.get(option, option)
        logger.warning("%s=%s (strategy_def#%s) is an option of %s: strategy %r does not use it, so it has no "
                       "effect here.", setting, value, option, ", ".join(name for name, _ in owners), cls.name)

"""The strategy factory the bundles call (app/strategies/__init__.py: build_strategy)."""

from __future__ import annotations

import os

import pytest
from monai.bundle import ConfigParser

from app.strategies import GMDStrategy, PlainStrategy, build_strategy, strategy_options

BUNDLES = os.path.join(os.path.dirname(__file__), "..", "..", "bundles")


def test_an_option_of_another_strategy_is_left_out():
    # the bundles pass every strategy's knobs to one factory: gmd ignores cggm's rho, plain ignores subsets
    gmd = build_strategy("gmd", subsets=5, seed=3, rho=1.2, head_lr=1e-3)
    assert isinstance(gmd, GMDStrategy) and gmd.subsets == 5 and gmd.seed == 3
    assert isinstance(build_strategy("plain", subsets="all", seed=1), PlainStrategy)


def test_a_misspelt_option_is_refused_with_the_option_it_resembles():
    with pytest.raises(ValueError, match=r"'subset' \(strategy_def#subset .*\) is an option of no strategy: "
                                         r"did you mean 'subsets'\?"):
        build_strategy("gmd", subset=5)
    with pytest.raises(ValueError, match=r"'zzzz' .* is an option of no strategy: the options are \["):
        build_strategy("plain", zzzz=1)


@pytest.mark.parametrize("bundle,extra", [("brats_gmd", ()), ("brats_gmd", ("multi_gpu_train.yaml",)),
                                          ("mosi_gmd", ()), ("mosi_gmd", ("multi_gpu_train.yaml",))])
def test_every_knob_the_bundles_pass_is_an_option_of_some_strategy(bundle, extra):
    files = [os.path.join(BUNDLES, bundle, "configs", f) for f in ("train.yaml", *extra)]
    config = ConfigParser.load_config_files(files)
    passed = {k for k in config["strategy_def"] if not k.startswith("_") and k != "name"}
    passed |= {k.split("#", 1)[1] for k in config if k.startswith("strategy_def#")}
    assert passed and passed <= strategy_options()

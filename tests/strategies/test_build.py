"""The strategy factory the bundles call (app/strategies/__init__.py: build_strategy)."""

from __future__ import annotations

import os

import pytest
from monai.bundle import ConfigParser

from app.strategies import BUNDLE_DEFAULTS, GMDStrategy, PlainStrategy, build_strategy, strategy_options

BUNDLES = os.path.join(os.path.dirname(__file__), "..", "..", "bundles")


def test_an_option_of_another_strategy_is_left_out():
    # the bundles pass every strategy's knobs to one factory: gmd ignores cggm's rho, plain ignores subsets
    gmd = build_strategy("gmd", subsets=5, seed=3, rho=1.2, head_lr=1e-3)
    assert isinstance(gmd, GMDStrategy) and gmd.subsets == 5 and gmd.seed == 3
    assert isinstance(build_strategy("plain", subsets="all", seed=1), PlainStrategy)


def test_an_option_of_another_strategy_set_away_from_its_default_is_named_in_a_warning(caplog):
    """``--strategy plain --gmd_subsets 3``, or the predict recipe's warmup_iterations under ``--strategy gmd``,
    trained as if the option had not been given, without a word in the log."""
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("plain", subsets=3, seed=0, diagnostics_interval=20, rho=1.2)
        build_strategy("gmd", subsets="all", warmup_iterations=200, rho="1.3", head_lr=1e-3, b_clip=None)
    assert [r.getMessage() for r in caplog.records] == [
        "gmd_subsets=3 (strategy_def#subsets) is an option of gmd, gmd_approx: strategy 'plain' does not use it, so "
        "it has no effect here.",
        "warmup_iterations=200 (strategy_def#warmup_iterations) is an option of predict: strategy 'gmd' does not use "
        "it, so it has no effect here.",
        "cggm_rho=1.3 (strategy_def#rho) is an option of cggm: strategy 'gmd' does not use it, so it has no effect "
        "here.",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.strategies"):  # near a default is not the default
        build_strategy("gmd", rho=1.205)
    assert [r.getMessage() for r in caplog.records] == [
        "cggm_rho=1.205 (strategy_def#rho) is an option of cggm: strategy 'gmd' does not use it, so it has no effect "
        "here."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.strategies"):  # a default as a command line may spell it
        build_strategy("plain", subsets=" All ", b_clip=None)
    assert not caplog.records
    # the bundles pass their diagnostics_interval (20) to every strategy: another value was set by the user, and
    # plain, dropout and predict record no diagnostics
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("dropout", diagnostics_interval=5)
        build_strategy("predict", diagnostics_interval="20")
        build_strategy("plain", diagnostics_interval=0)
    assert [r.getMessage() for r in caplog.records] == [
        "diagnostics_interval=5 (strategy_def#diagnostics_interval) is an option of gmd, gmd_approx, cggm: strategy "
        "'dropout' does not use it, so it has no effect here."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="app.strategies"):  # the bundles' defaults, as they spell them
        for bundle in ("brats_gmd", "mosi_gmd"):
            parser = ConfigParser()
            parser.read_config(os.path.join(BUNDLES, bundle, "configs", "train.yaml"))
            options = {k: parser.get_parsed_content(f"strategy_def#{k}") for k in parser["strategy_def"]
                       if k not in ("_target_", "name")}
            for name in ("plain", "dropout", "gmd", "gmd_approx", "cggm", "predict"):
                build_strategy(name, **options)
            assert {k: parser.get_parsed_content(k) for k in BUNDLE_DEFAULTS} == BUNDLE_DEFAULTS, bundle
    assert not caplog.records


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


def test_a_strategy_of_ones_own_trains_through_an_override_file(monkeypatch):
    """The README's recipe (examples/my_recipe.yaml) replaces strategy_def with the worked example outside the
    package, examples/my_strategies.py, whose step gives the gradient of the loss it documents."""
    import torch

    from app.losses import DiceCELoss
    from app.networks import DSUNet

    examples = os.path.join(BUNDLES, "..", "examples")
    monkeypatch.syspath_prepend(examples)
    files = [os.path.join(BUNDLES, "brats_gmd", "configs", "train.yaml"), os.path.join(examples, "my_recipe.yaml")]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser["seed"] = 7
    strategy = parser.get_parsed_content("strategy_def")
    assert repr(strategy) == "UnimodalAux(seed=7, aux_weight=0.5)"

    torch.manual_seed(0)
    model = DSUNet(features=(4, 8), out_channels=3)
    image, target = torch.randn(3, 4, 8, 8, 8), (torch.rand(3, 3, 8, 8, 8) > 0.7).float()
    mask = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, False, False]])
    loss_function = DiceCELoss(sigmoid=True, squared_pred=True)
    params = list(model.parameters())

    def grads(step) -> list:
        model.zero_grad(set_to_none=True)
        step()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    def by_hand(weight: float) -> None:  # the class's formula, written out: a loss per sequence on its own output
        per_mod = model.per_modality(image, mask)
        own = [loss_function(per_mod[mask[:, m], m], target[mask[:, m]]) for m in range(4)]
        (loss_function(model(image, mask), target) + weight * torch.stack(own).mean()).backward()

    result = None

    def step() -> None:
        nonlocal result
        result = strategy.step(model, image, mask, target, loss_function)

    for got, want in zip(grads(step), grads(lambda: by_hand(0.5))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the reported loss is the fused prediction's, as every strategy reports it; aux_weight 0 trains as plain
    torch.testing.assert_close(result.loss, loss_function(model(image, mask), target).detach())
    plain = PlainStrategy()
    strategy.aux_weight = 0.0
    for got, want in zip(grads(step), grads(lambda: plain.step(model, image, mask, target, loss_function))):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"strategy_def#aux_weight -1 must be a finite number >= 0, e.g. 0.5"):
        type(strategy)(aux_weight=-1)


def test_listing_the_strategies_does_not_import_monai():
    # `python -m app ablate` reads the strategy names at start-up; MONAI is imported only when a step runs
    import subprocess
    import sys

    code = "import sys, app.ablation, app.strategies; sys.exit('monai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.join(BUNDLES, "..")).returncode == 0


@pytest.mark.parametrize("name,option,value,message", [
    ("gmd", "subsets", "x", "--gmd_subsets 'x' must be all or a whole number >= 1 (subsets per iteration), e.g. "
                            "--gmd_subsets 5."),
    ("gmd_approx", "subsets", 2.5, "--gmd_subsets 2.5 must be all or a whole number >= 1"),
    ("gmd", "vjp_chunk", 0, "--vjp_chunk 0 must be a whole number >= 1, e.g. --vjp_chunk 1."),
    ("gmd", "vjp_chunk", "abc", "--vjp_chunk 'abc' must be a whole number >= 1"),
    ("gmd", "diagnostics_interval", -1, "--diagnostics_interval -1 must be a whole number >= 0"),
    ("cggm", "rho", "abc", "--cggm_rho 'abc' must be a finite number > 0 (it scales every balance term B_i: 0 "
                           "would zero the encoders' gradients, a negative value reverse them), e.g. --cggm_rho 1.2."),
    # 0 zeroed every encoder's gradient, -1.2 turned it into gradient ascent, both without a word
    ("cggm", "rho", 0, "--cggm_rho 0 must be a finite number > 0"),
    ("cggm", "rho", -1.2, "--cggm_rho -1.2 must be a finite number > 0"),
    ("cggm", "cggm_lambda", "x", "--cggm_lambda 'x' must be a number >= 0"),
    ("cggm", "head_lr", 0, "--cggm_head_lr 0 must be a number > 0"),
    ("cggm", "b_clip", "none", "--cggm_b_clip 'none' must be a number > 0"),
    ("predict", "warmup_iterations", "x", "--warmup_iterations 'x' must be a whole number >= 0"),
    ("predict", "vicreg_variance", float("nan"), "--vicreg_variance nan must be a number >= 0"),
    ("predict", "confidence_weight", -1, "--confidence_weight -1 must be a number >= 0"),
    ("cggm", "rho", True, "--cggm_rho True must be a finite number"),  # YAML's true, not a number
    ("cggm", "rho", "inf", "--cggm_rho 'inf' must be a finite number"),
])
def test_a_strategy_option_that_is_not_a_valid_number_is_named_with_its_fix(name, option, value, message):
    """--vjp_chunk abc or --cggm_rho abc stopped the run with int()'s or float()'s bare traceback, which the
    bundle cannot report as one line; --vjp_chunk 0 ran with 1 and --gmd_subsets 2.5 with 2 subsets."""
    with pytest.raises(ValueError) as err:
        build_strategy(name, **{option: value})
    assert str(err.value).startswith(message)
    # raised by a raise statement of the package: the bundle prints it as one error line, without a traceback
    from app.engines.utils import _input_error
    assert _input_error(err.value) is err.value


@pytest.mark.parametrize("name", ["gmd", "gmd_approx"])
def test_one_subset_per_step_is_named_as_no_decoupling(name, caplog):
    """With --gmd_subsets 1 no pair of subset gradients exists, so the run decouples nothing."""
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy(name, subsets=2)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy(name, subsets=1)
    assert [r.getMessage()[:48] for r in caplog.records] == ["--gmd_subsets 1 trains one sampled subset per st"]
    assert "nothing to decouple" in caplog.records[0].getMessage()


def test_a_vjp_chunk_given_to_gmd_approx_is_warned(caplog):
    """gmd_approx takes vjp_chunk (the bundles pass it to both GMD variants) and never uses it: --vjp_chunk 4
    trained exactly as 1, without a word."""
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("gmd", vjp_chunk=4)
        build_strategy("gmd_approx", vjp_chunk=1)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("gmd_approx", vjp_chunk=4)
    assert [r.getMessage() for r in caplog.records] == [
        "--vjp_chunk 4 has no effect with --strategy gmd_approx: it batches exact GMD's per-subset vector-Jacobian "
        "products, and gmd_approx takes its Gram matrix from the trunk outputs without any. Leave --vjp_chunk out, or "
        "train --strategy gmd."]


def test_a_default_given_as_text_is_no_change(caplog):
    """A YAML string such as rho: "1.20" is the default 1.2: no "has no effect" warning."""
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("gmd", rho="1.20", head_lr=" 1e-3 ", b_clip="None")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="app.strategies"):
        build_strategy("gmd", rho="1.3")
    assert [r.getMessage()[:14] for r in caplog.records] == ["cggm_rho=1.3 ("]

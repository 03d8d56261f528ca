"""The one reading of true/false shared by every boolean knob."""

from __future__ import annotations

import numpy as np
import pytest

from app.flags import parse_bool


@pytest.mark.parametrize("value", [True, 1, np.bool_(True), np.int64(1), "true", "True", " TRUE ", "1"])
def test_true_spellings(value):
    assert parse_bool(value, "amp") is True


@pytest.mark.parametrize("value", [False, 0, np.bool_(False), "false", "False", "0", " false\n"])
def test_false_spellings(value):
    assert parse_bool(value, "amp") is False


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "", "ture", "none", None, 2, -1, 0.5, [True]])
def test_anything_else_is_an_error_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"--amp must be true or false, got .*: pass --amp true or --amp false"):
        parse_bool(value, "amp")


@pytest.mark.parametrize("value, example", [(2021, "./2021"), (3.1, "./NAME"), (np.int64(7), "./7"), (True, "./NAME")])
def test_a_path_read_as_a_number_names_the_setting_and_the_fix(value, example):
    from app.flags import check_paths

    with pytest.raises(ValueError, match=rf"--dataset_dir {value} was read as a number, not as a folder or file "
                                         rf".*e\.g\. --dataset_dir {example}, or give its absolute path"):
        check_paths(dataset_dir=value)


def test_paths_and_unset_paths_pass(tmp_path):
    from app.flags import check_paths

    check_paths(dataset_dir="2021", output_dir=tmp_path, eval_datalist=None)


def test_check_share_takes_numbers_from_zero_up_to_one():
    from app.flags import check_share

    check_share(sw_overlap=0, other=0.5, third="0.99")
    for bad in (1, -0.1, "half", None, True):
        with pytest.raises(ValueError, match="must be a number >= 0 and < 1, e.g. --sw_overlap 0.5"):
            check_share(sw_overlap=bad)


def test_check_positive_with_zero_allowed_refuses_only_negative_or_non_finite_values():
    from app.flags import check_positive

    check_positive(allow_zero=True, weight_decay=0)
    check_positive(allow_zero=True, weight_decay=0.1)
    for bad in (-1, -1e-9, float("nan"), float("inf"), "abc", True):
        with pytest.raises(ValueError, match=r"--weight_decay .* must be a number >= 0, e.g. --weight_decay 0.01\."):
            check_positive(allow_zero=True, weight_decay=bad)
    with pytest.raises(ValueError, match="must be a number > 0"):
        check_positive(learning_rate=0)

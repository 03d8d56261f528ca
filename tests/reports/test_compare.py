"""``python -m app compare``: evaluation reports made apart, tabulated and compared case by case."""

from __future__ import annotations

import json

import pytest

from app.__main__ import main as app_main
from tests.reports.test_paired import _report


def _write(folder, values, name="subset_dice.json"):
    folder.mkdir(parents=True)
    (folder / name).write_text(json.dumps(_report(values)))
    return folder


def test_compare_tabulates_reports_and_compares_each_with_the_first(tmp_path, capsys):
    first = _write(tmp_path / "plain_eval", {"flair": {"a": 0.5, "b": 0.6}, "t1": {"a": 0.2, "b": 0.4}})
    second = _write(tmp_path / "gmd_eval", {"flair": {"a": 0.6, "b": 0.9}, "t1": {"a": 0.1, "b": 0.4}})
    out = tmp_path / "cmp"
    assert app_main(["compare", str(first), str(second / "subset_dice.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Paired differences from plain_eval: mean" in printed and "| gmd_eval - plain_eval |" in printed
    assert "| model | mean | WT | TC | ET |" in printed and "Each model's mean minus plain_eval's" in printed
    assert "| flair | +0.200 [+0.100, +0.300] 2/0 |" in printed
    table = json.loads((out / "compare.json").read_text())
    assert table["strategies"] == ["plain_eval", "gmd_eval"] and table["paired"]["reference"] == "plain_eval"
    assert table["reports"]["gmd_eval"] == str(second / "subset_dice.json")
    assert (out / "compare.md").read_text(encoding="utf-8").startswith("# Comparison of 2 evaluations")
    # --names, and a reference that is not called plain
    assert app_main(["compare", str(second), str(first), "--names", "b,a", "--metrics", "WT"]) == 0
    assert "## Paired differences from b: WT" in capsys.readouterr().out


def test_compare_refuses_what_it_cannot_compare(tmp_path, capsys):
    seg = _write(tmp_path / "seg", {"flair": {"a": 0.5, "b": 0.6}})
    other = _write(tmp_path / "other", {"flair": {"a": 0.5, "c": 0.6}})
    senti = tmp_path / "senti" / "subset_metrics.json"
    senti.parent.mkdir()
    senti.write_text(json.dumps({"subsets": {"text": {"Acc2": 1.0, "MAE": 0.5, "F1": 1.0, "Acc7": 0.0, "Corr": 0.1,
                                                      "n": 1}}}))
    odd = tmp_path / "odd.json"  # another tool's table: which columns to compare is the user's to say
    odd.write_text(json.dumps({"subsets": {"flair": {"Dice": 0.5}}}))
    cases = [
        (["compare", str(seg)], "two evaluation reports or more"),
        (["compare", str(seg), str(tmp_path / "none")], "does not exist"),
        (["compare", str(seg), str(tmp_path)], "holds no subset_dice.json or subset_metrics.json"),
        (["compare", str(seg), str(senti)], "different kinds"),
        (["compare", str(odd), str(odd), "--names", "a,b"], "name the ones to compare with --metrics"),
        (["compare", str(seg), str(other), "--names", "a"], "--names 'a' must give 2 different"),
        (["compare", str(seg), str(other), "--metrics", "Dice"], "choose --metrics among"),
    ]
    for argv, message in cases:
        assert app_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    # reports of different cases are tabulated; the case-by-case comparison says why it is absent
    assert app_main(["compare", str(seg), str(other)]) == 0
    assert "No case-by-case comparison of mean: the strategies were not scored on the same cases." in \
        capsys.readouterr().out
    # a file where the output folder would be: refused before anything is read
    (tmp_path / "file").write_text("")
    assert app_main(["compare", str(seg), str(other), "--out", str(tmp_path / "file" / "cmp")]) == 2
    assert not (tmp_path / "file" / "cmp").exists()


@pytest.mark.parametrize("bad", ["[1, 2]", "{\"subsets\": {}}", "not json"])
def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys, bad):
    seg = _write(tmp_path / "seg", {"flair": {"a": 0.5, "b": 0.6}})
    (tmp_path / "bad.json").write_text(bad)
    assert app_main(["compare", str(seg), str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_output_cut_short_by_its_reader_ends_without_a_traceback(tmp_path):
    """`python -m app compare A B | head -1` ended in a BrokenPipeError traceback: it ends as `cat` would, with
    SIGPIPE's status 141 and nothing on stderr."""
    import subprocess
    import sys

    from tests.bundles.helpers import REPO

    folders = []
    for i in range(2):
        cases = {f"c{j}": 0.5 + 0.01 * ((i + j) % 3) for j in range(40)}
        folders.append(_write(tmp_path / f"e{i}", {"flair": cases, "t1": cases, "t2": cases}))
    cmd = [sys.executable, "-m", "app", "compare", *map(str, folders * 400), "--names",
           ",".join(f"m{i}" for i in range(800))]  # tables larger than a pipe's buffer
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err

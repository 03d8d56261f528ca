"""Ablation runner: train one bundle with several gradient strategies at the same seed and budget.

``python -m app ablate --bundle bundles/<name> --strategies plain,dropout,gmd,cggm --max_epochs E
--output_dir O [--time_limit_minutes T] [bundle overrides ...]`` runs, for each strategy, the
bundle's two documented commands: ``train.yaml`` (same seed, epochs and wall-clock limit for all)
then ``train.yaml + evaluate.yaml`` on the held-out data:

- a segmentation bundle (``dataset_dir``) is scored on the validation cases of the run's own
  ``datalist.json`` (the split depends only on the seed, so every strategy holds out the same cases);
- a sentiment bundle (``data_path``) is scored on ``--eval_split`` (default: its ``val_split``); a
  segmentation bundle refuses ``--eval_split``.

Every argument the runner does not know (``--dataset_dir D``, ``--data_path P --trust_pickle
true``, ``--features "[...]"``) goes to both commands unchanged, except ``--config_file``: its override
files (recipes such as ``bundles/brats_gmd/configs/demo.yaml``) go after ``train.yaml`` in both commands; and
``--hd95 true`` (segmentation), which goes to the evaluations only and adds the HD95 tables (``HD95_WT``, ``HD95_TC``,
``HD95_ET``, mm, lower is better) after the Dice ones, as does ``--hd95_workers N`` (threads for those distances;
it changes no value, so a finished evaluation is kept whatever it was); ``--strategy``, ``--ckpt_path`` and
``--eval_datalist``, which each stage sets itself, are refused. Each finished
stage is kept, so an interrupted ablation resumes with the same command (a training stage stopped before its end
resumes from its ``checkpoint_last.pt`` when its settings are the command's); a stage finished with other settings (seed,
budget, overrides, checkpoint) or trained with another loss than the stages before it (as their training checkpoints
record it) is an error rather than a silent mix of runs, and a second ablation started on the
same output folder while one runs is refused. Writes ``O/<strategy>/{train,eval}`` and
``O/ablation.{json,md,png}`` (:mod:`app.reports.ablation`).

A strategy may carry a GMD subset count, ``gmd:5``, which sets ``--gmd_subsets 5``; a count given
elsewhere (``--gmd_subsets``, a recipe's ``gmd_subsets``) is refused, as ``gmd`` would train with it
under the name of the all-subset method.

``--seeds 0,1,2`` (instead of ``--seed``) repeats the whole ablation at each seed in
``O/seed_<s>/`` and adds ``O/ablation_seeds.{json,md}``: every cell as the mean and sample
standard deviation over the seeds, because one seed cannot separate strategies whose differences
are within training noise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from app.atomic import WriteError, atomic_write_text, check_writable_folder, locked_folder, write_error
from app.data.errors import check_regular_file
from app.flags import check_counts, check_positive
from app.metrics.hausdorff import check_hd95, check_hd95_workers
from app.reports.ablation import (
    ablation_table, format_ablation_markdown, format_seed_markdown, seed_table, write_ablation_report,
    write_seed_report,
)
from app.reports.subset_report import HD95_METRICS
from app.strategies import STRATEGIES

__all__ = ["HD95_METRICS", "BundleLayout", "bundle_layout", "parse_strategies", "run_ablation", "run_ablation_seeds", "main"]


@dataclass(frozen=True)
class BundleLayout:
    """What the runner needs to know of a bundle family.

    Attributes:
        kind: ``segmentation`` or ``sentiment``.
        report: file name the evaluation writes into its output folder.
        metrics: default table metrics; the first is the chart's headline metric.
    """

    kind: str
    report: str
    metrics: tuple[str, ...]


SEGMENTATION = BundleLayout("segmentation", "subset_dice.json", ("mean", "WT", "TC", "ET"))
SENTIMENT = BundleLayout("sentiment", "subset_metrics.json", ("Acc2", "MAE", "F1", "Acc7", "Corr"))
#: The sentiment bundle's table metrics for ``--task classification`` (its report has Acc and F1).
SENTIMENT_CLASSIFICATION_METRICS: tuple[str, ...] = ("Acc", "F1")
#: Every metric of each bundle family's report (sentiment: regression), which ``--metrics`` may choose.
REPORT_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("mean", "WT", "TC", "ET", *HD95_METRICS),
    "sentiment": ("Acc2", "Acc2_has0", "F1", "Acc7", "MAE", "Corr"),
}


def _budget(max_epochs: int, minutes: float | None) -> str:
    """A stage's training budget as the report titles give it: ``1 epoch``, ``25 epochs or 6 min``."""
    epochs = f"{max_epochs} epoch" + ("" if int(max_epochs) == 1 else "s")
    return epochs + (f" or {minutes:g} min" if minutes else "")


def _cli_value(text: str) -> Any:
    """A command-line value as the bundle reads it: ``0`` a number, ``abc`` a string (an empty one stays text)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None else value


def _configs(bundle: Path) -> tuple[Path, Path]:
    train, evaluate = bundle / "configs" / "train.yaml", bundle / "configs" / "evaluate.yaml"
    for path in (train, evaluate):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --bundle must be a bundle folder with configs/train.yaml "
                                    "and configs/evaluate.yaml (e.g. bundles/brats_gmd).")
    return train, evaluate


def _load_config(config_file: Path) -> dict:
    with open(config_file) as f:
        return yaml.safe_load(f) or {}


def bundle_layout(bundle: str | os.PathLike) -> BundleLayout:
    """The family of a bundle, from the data keys of its ``configs/train.yaml``.

    Raises:
        ValueError: ``configs/train.yaml`` has neither ``dataset_dir`` (segmentation) nor ``data_path`` (sentiment).
    """
    train, _ = _configs(Path(bundle))
    config = _load_config(train)
    if "dataset_dir" in config:
        return SEGMENTATION
    if "data_path" in config:
        return SENTIMENT
    raise ValueError(f"{train} has neither 'dataset_dir' (segmentation) nor 'data_path' (sentiment): "
                     "the ablation runner cannot tell how to evaluate this bundle.")


def parse_strategies(spec: str | Sequence[str], kind: str | None = None) -> list[tuple[str, str, str | None]]:
    """``"plain,gmd:5"`` -> ``[("plain", "plain", None), ("gmd_k5", "gmd", "5")]`` (label, strategy, subsets).

    Args:
        spec: the ``--strategies`` list.
        kind: the bundle's branch (:attr:`BundleLayout.kind`); a strategy that branch's network cannot
            train (``predict`` for segmentation) is refused. ``None`` checks names and counts only.

    Raises:
        ValueError: an empty list, an unknown or repeated strategy, one the branch cannot train, or a subset
            count on a strategy other than GMD or not a positive integer.
    """
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in str(part).split(",")]
    out, seen = [], set()
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, _, k = item.partition(":")
        name, k = name.strip(), k.strip()
        if name.lower() not in STRATEGIES:  # before any strategy trains, not when its turn comes
            raise ValueError(f"Unknown strategy {name!r} in --strategies: choose from {sorted(STRATEGIES)}.")
        if kind is not None and kind not in STRATEGIES[name.lower()].branches:
            usable = [n for n, cls in STRATEGIES.items() if kind in cls.branches]
            branches = "/".join(STRATEGIES[name.lower()].branches)
            raise ValueError(f"Strategy {name!r} in --strategies trains only {branches} networks, and this bundle "
                             f"is {kind}: remove it, or choose from {usable}.")
        if k:
            # only the GMD strategies read --gmd_subsets: another would train unchanged under a "_k" label
            takes_k = "subsets" in inspect.signature(STRATEGIES[name.lower()].__init__).parameters
            if not takes_k:
                raise ValueError(f"Strategy {item!r} in --strategies: only GMD strategies take a subset count "
                                 f"(e.g. gmd:5 or gmd_approx:5); write {name} without ':{k}'.")
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"Strategy {item!r} in --strategies: the subset count must be a positive integer, "
                                 "e.g. gmd:5.")
        label = f"{name}_k{k}" if k else name
        if label in seen:
            raise ValueError(f"Strategy {item!r} is listed twice in --strategies.")
        seen.add(label)
        out.append((label, name, k or None))
    if not out:
        raise ValueError("--strategies is empty: name at least one, e.g. --strategies plain,dropout,gmd,cggm.")
    return out


def _die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that ends the child with SIGTERM when ``parent`` dies (Linux; None elsewhere).

    ``subprocess.run`` kills its child when the ablation is stopped by Ctrl-C or SIGTERM, but not when
    the ablation is killed outright (SIGKILL, the OOM killer, ``timeout -s KILL``): the training went on
    alone, and the ablation run again to resume trained a second model into the same folder at the
    same time, both writing its checkpoints.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    def preexec() -> None:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _run_logged(cmd: Sequence[str], log: Path, append: bool = False) -> int:
    """Run ``cmd`` with its output in ``log``; returns its exit status. A stop of the ablation lets it stop cleanly.

    ``subprocess.run`` killed the bundle run (SIGKILL) a quarter of a second after Ctrl-C or a SIGTERM reached the
    ablation, so a training stage never wrote the checkpoint that :class:`~app.engines.StopOnSignal` writes at a
    stop: the iterations since its last one were lost, and a stage stopped by ``kill PID`` or ``docker stop`` was
    not told at all. The run has its own process group instead, so that the terminal's Ctrl-C (sent to the whole
    foreground group) and ``kill -- -PGID`` reach it once, through the ablation, which passes every stop signal
    on and waits for the run to end (a second Ctrl-C, 2 s or more after the first, ends a training at once, as it does
    without the ablation).
    """
    import signal

    from app.engines.checkpoint import ABLATION_STAGE_ENV  # here: the engines import monai's handlers

    f = None
    try:  # a full disk or a read-only stage folder: the file and the fix, not the disk's bare errno
        log.parent.mkdir(parents=True, exist_ok=True)
        if log.is_symlink():  # open(log, "w") would write (and truncate) the file a link under the log's name points to
            log.unlink()
        f = open(log, "a" if append else "w")
        f.write(" ".join(cmd) + "\n")
        f.flush()
    except OSError as err:
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        raise write_error(err, log) from err
    with f:
        # the stage's hints on how to continue a stopped training name this ablation's command, not the stage's
        env = {**os.environ, ABLATION_STAGE_ENV: "1"}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with(os.getpid()), process_group=0)
        try:
            return proc.wait()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through app.atomic.run_interruptible
            signum = getattr(stop, "signum", signal.SIGINT)
            print(f"Stopping: {signal.Signals(signum).name} passed on to the running stage, which ends after its "
                  f"current iteration (a training writes its resumable checkpoint first; see {log}). Run the same "
                  "command again to resume the ablation: finished stages are kept.", flush=True)
            while True:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)
                try:
                    proc.wait()
                    break
                except KeyboardInterrupt as again:  # passed on too: a second Ctrl-C ends a training at once
                    signum = getattr(again, "signum", signal.SIGINT)
            raise


def _run_bundle(configs: Sequence[Path], bundle: Path, args: Sequence[str], log: Path, append: bool = False,
                fix: str = "") -> float:
    """Run one bundle command with its output in ``log`` (after what ``log`` holds, with ``append``); returns its
    wall time. A failure raises a ``RuntimeError`` with the command's last ``error:`` line, then ``fix``."""
    config = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(bundle), *args]
    start = time.perf_counter()
    returncode = _run_logged(cmd, log, append)
    if returncode != 0:
        errors = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("error: ")]
        reason = f": {errors[-1]}" if errors else ""
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {returncode}{reason} (its output is in {log})."
                           f"{' ' + fix if fix else ''}")
    return time.perf_counter() - start


def _interrupted_training(run_dir: Path, stamp: Path, settings: dict[str, Any], done: Path) -> float | None:
    """The time a stage's interrupted training had trained (seconds, as its checkpoint records it) when it can be
    resumed under ``settings``, else None; says so when it cannot.

    A stage stopped before its end (Ctrl-C, a scheduler's time limit, a kill) leaves ``checkpoint_last.pt``, and the
    ablation run again used to train it again from its first iteration, throwing away hours of a long stage. It is
    resumed (the training bundle's ``--resume true``, bit-identical on CPU) when the stage's recorded settings are
    this command's; a stage interrupted under other settings (another seed, budget or override) trains again from
    the start, as a resume would refuse them. Call before :func:`_reusable`, which records this command's settings.
    """
    checkpoint = run_dir / "models" / "checkpoint_last.pt"
    if done.exists() or not checkpoint.is_file() or _unreadable(stamp) or _option(settings["args"], "resume"):
        return None
    recorded = _read_json(stamp)
    if recorded != settings:
        if recorded is not None:
            print(f"note: the training of {stamp.parent} was interrupted under other settings than this command's "
                  f"({' '.join(recorded.get('args', []))}): it trains again from the start.", flush=True)
        return None
    import torch

    try:
        # memory-mapped: only the time is read, not the weights and optimizer state
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return max(0.0, float(state["time_limit"]["elapsed_seconds"]))
    except Exception:  # noqa: BLE001 - the resume itself names a damaged checkpoint; an older one records no time
        return 0.0


def _check_eval_split_applies(layout: BundleLayout, eval_split: str | None) -> None:
    """Refuse ``--eval_split`` for a segmentation bundle, before anything is made.

    Its evaluations score the held-out cases of each run's own ``datalist.json``: the option was dropped without a
    word, and the tables read as scores on the split it named.
    """
    if eval_split is not None and layout is not SENTIMENT:
        raise ValueError(f"--eval_split {eval_split} applies to sentiment bundles only: a {layout.kind} ablation scores "
                         "each run on the validation cases of its own datalist.json (split by --seed). Leave "
                         "--eval_split out.")


def _check_eval_split(data_path: Any, trust_pickle: Any, eval_split: str,
                      labels: Mapping[str, Any] | None = None) -> None:
    """Refuse a sentiment ``eval_split`` that the evaluations cannot score before any strategy trains: a
    split the data file lacks, or one whose labels the runs cannot use (no ``label_key`` labels, hidden
    (NaN) labels, class ids beyond ``out_channels``, an utterance with no modality). The split is otherwise
    read only by the first evaluation, after that strategy's whole training.

    A file that cannot be read is left to the training command, whose error names it and the fix.

    Args:
        data_path: the MMSA file of the runs.
        trust_pickle: as the runs get it.
        eval_split: the split every evaluation scores.
        labels: ``{"label_key", "task", "num_classes"}`` of the runs (:func:`_label_settings`); ``None``
            checks only that the split exists.
    """
    from app.data.mmsa import MMSADataset, load_mmsa, mmsa_split

    if not isinstance(data_path, (str, os.PathLike)) or not Path(data_path).is_file():
        return
    try:
        data = load_mmsa(data_path, trust_pickle)
    except ValueError:
        return
    mmsa_split(data, eval_split, data_path)  # names the splits the file has
    if labels is not None:
        # the dataset evaluate.yaml builds: its errors name the file, the split and the fix
        MMSADataset(data, eval_split, **labels)


def _label_settings(bundle_args: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``label_key``, ``task`` and number of classes the sentiment runs read their labels with (the
    command line's, else the configs'), or ``None`` when one is not a plain value (a ``@reference`` or
    ``$expression`` of a recipe, or a malformed number): the runs' own checks see those."""
    values = {key: _option(bundle_args, key) or config.get(key) for key in ("label_key", "task", "out_channels")}
    if any(not isinstance(v, (str, int)) or isinstance(v, bool) or str(v).startswith(("@", "$"))
           for v in values.values()):
        return None
    try:
        classes = int(values["out_channels"])
    except ValueError:
        return None
    return {"label_key": str(values["label_key"]), "task": str(values["task"]), "num_classes": classes}


def _option(args: Sequence[str], key: str) -> str | None:
    """The value of ``--key value`` or ``--key=value`` in ``args`` (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def _without(args: Sequence[str], key: str) -> list[str]:
    """``args`` less every ``--key value`` / ``--key=value`` pair, and a bare ``--key`` (a flag: the next
    argument is another option, or there is none), whose next option is kept."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == f"--{key}":
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
        elif not arg.startswith(f"--{key}="):
            out.append(arg)
    return out


def _hd95_option(args: Sequence[str], layout: BundleLayout) -> bool:
    """Whether the evaluations score HD95 (``--hd95`` among the bundle arguments).

    ``--hd95`` is a setting of ``evaluate.yaml`` only: passed to the training commands too, as the other
    bundle arguments are, it stopped every stage (training refuses a setting it does not have), and it would
    have changed finished training stages' records although it changes nothing they trained.

    Raises:
        ValueError: the value is not true or false, it is true and scipy is missing, or the bundle is not a
            segmentation bundle (sentiment reports have no distances).
    """
    value = _option(args, "hd95")
    # a bare --hd95 (last, or before another option) is true on the bundle's command line (MONAI reads a flag
    # without a value as true): it scores HD95 here too, instead of being dropped with the evaluations left without
    last = max((i for i, arg in enumerate(args) if arg == "--hd95" or arg.startswith("--hd95=")), default=None)
    if last is not None and args[last] == "--hd95" and (last + 1 == len(args) or args[last + 1].startswith("--")):
        value = "true"
    if value is None:
        return False
    if layout is not SEGMENTATION:
        raise ValueError(f"--hd95 {value}: HD95 is a distance between segmentations; this bundle is {layout.kind}. "
                         "Leave --hd95 out.")
    return check_hd95(value)


def _override_files(args: Sequence[str], train: Path, evaluate: Path) -> list[Path]:
    """The override files (recipes) of a ``--config_file`` among the bundle arguments, in order.

    Passed on unchanged, that ``--config_file`` would replace the runner's own: training would use the
    recipe, but evaluation would lose ``evaluate.yaml`` and fail once the first strategy had trained. The
    bundle's own ``train.yaml`` and ``evaluate.yaml`` in the list are left out: the runner places them.

    Raises:
        ValueError: a listed file does not exist, or is a named pipe, device or socket.
    """
    from app.bundle_args import config_files  # imports monai: only for a command that has a --config_file

    value = _option(args, "config_file")
    if value is None:
        return []
    try:
        files = config_files(value.strip())
    except ValueError:
        raise ValueError(f"--config_file {value!r} is not a list of files: write it as "
                         "\"['bundles/brats_gmd/configs/train.yaml','my_recipe.yaml']\" or give one file.") from None
    own = {os.path.realpath(train), os.path.realpath(evaluate)}
    out = []
    for name in filter(None, files):
        # a named pipe was called "not found", although ls lists it
        check_regular_file(name, "Pass a YAML or JSON file as --config_file.")
        if not os.path.isfile(name):
            raise ValueError(f"--config_file: {name} not found: give the override files (recipes) to train and evaluate "
                             "every strategy with, e.g. --config_file bundles/brats_gmd/configs/demo.yaml.")
        if os.path.realpath(name) not in own:
            out.append(Path(name))
    for path in out:
        config = _load_config(path)
        whole = config.get("strategy_def")
        replaced = isinstance(whole, dict) and (whole.get("_target_") != "app.strategies.build_strategy"
                                                or whole.get("name") != "@strategy")
        if replaced or any(k in config for k in ("strategy_def#_target_", "strategy_def::_target_", "strategy_def#name",
                                                 "strategy_def::name")):
            # the runner sets --strategy per stage; a recipe's own strategy_def would ignore it and train its
            # strategy under every label of the table
            raise ValueError(f"--config_file: {path} replaces strategy_def, so every strategy of the ablation would "
                             "train the recipe's one: ablate compares the built-in strategies (--strategies); train "
                             "a strategy of your own with python -m monai.bundle run and that recipe.")
    return out


def _budget_and_seed(
    config: Mapping[str, Any], overrides: Sequence[Path], time_limit_minutes: float | None, seed: int | None
) -> tuple[float, int]:
    """The time limit and seed of every stage: those given, else the recipes' (merged into ``config``), else
    ``train.yaml``'s.

    Raises:
        ValueError: a recipe's value is not a number (the runner passes it on the command line).
    """
    def read(key: str, cast: Callable[[Any], Any]) -> Any:
        value = config.get(key, 0)
        try:
            if isinstance(value, bool):
                raise TypeError
            return cast(value)
        except (TypeError, ValueError):
            where = " or ".join(str(p) for p in overrides) or "train.yaml"
            raise ValueError(f"{key}: {value!r} in {where} is not a number: give --{key} to the ablation, or a number "
                             "in the recipe.") from None

    minutes = read("time_limit_minutes", float) if time_limit_minutes is None else float(time_limit_minutes)
    seed = read("seed", int) if seed is None else int(seed)
    # every stage's training would refuse them, after the output folder and the first stage's log were made
    check_positive(allow_zero=True, time_limit_minutes=minutes)
    check_counts(at_least=0, seed=seed)
    return minutes, seed


#: bundle settings every stage's commands set after the arguments the runner passes on, and the fix for each
_STAGE_SETTINGS = {
    "strategy": "each stage trains the strategy --strategies names for it: give --strategies {value} instead",
    "ckpt_path": "each stage scores the checkpoint its own training wrote (--checkpoint final or best): leave it out",
    "eval_datalist": "each stage is scored on the validation cases of its own datalist.json: leave it out",
    **{key: f"it is an option of the runner itself: give --{key} {{value}} before any '--'"
       for key in ("seed", "max_epochs", "time_limit_minutes", "output_dir", "eval_split")},
}


def _check_stage_settings(args: Sequence[str]) -> None:
    """Refuse a bundle argument that every stage's own value would replace (``--strategy gmd`` among the arguments
    passed on): the stage's commands put theirs after it, so it was dropped without a word.

    Raises:
        ValueError: naming the argument and where its value comes from instead.
    """
    for key, fix in _STAGE_SETTINGS.items():
        value = _option(args, key)
        if value is not None:
            raise ValueError(f"--{key} {value} would be replaced in every stage: {fix.format(value=value)}.")


def _check_subset_count(args: Sequence[str], overrides: Sequence[Path], planned: Sequence[tuple[str, str, str | None]]) -> None:
    """Refuse a GMD subset count given outside ``--strategies`` (``--gmd_subsets K`` or a recipe's ``gmd_subsets``).

    Every stage's command carries the bundle arguments and recipes, so such a count trained each ``gmd`` and
    ``gmd_approx`` stage without a count of its own on ``K`` subsets, under the label, and with the
    ``gmd_subsets`` record (null), of the all-subset method: the table compared another method than it named.

    Raises:
        ValueError: naming where the count was given and the ``--strategies`` spelling that gives it.
    """
    where, count = None, _option(args, "gmd_subsets")
    if count is not None:
        where = f"--gmd_subsets {count}"
    else:
        for path in overrides:
            value = _load_config(path).get("gmd_subsets")
            if value is not None:
                where, count = f"gmd_subsets: {value} in --config_file {path}", value
    if where is None or str(count).strip().lower() == "all":
        return
    gmd = [label for label, name, k in planned if k is None and name.lower() in ("gmd", "gmd_approx")]
    if not gmd:
        return  # no stage would read it: each GMD stage has its own count (gmd:K overrides it)
    try:
        check_counts(gmd_subsets=count)
    except ValueError:  # gmd:0 is no spelling to suggest
        raise ValueError(f"{where} is no subset count: the GMD stages take a whole number >= 1 of subsets per "
                         "iteration, given in --strategies (e.g. gmd:5), or all subsets (plain gmd).") from None
    spelled = ",".join(f"{STRATEGIES[label.lower()].name}:{str(count).strip()}" for label in gmd)
    raise ValueError(f"{where} would train the {', '.join(gmd)} stage(s) of --strategies on {str(count).strip()} "
                     f"subsets per iteration under the name of the all-subset method: give the count in --strategies "
                     f"instead ({spelled}) and leave gmd_subsets out.")


def _merged_config(configs: Sequence[Path], args: Sequence[str]) -> Any:
    """A MONAI ``ConfigParser`` of ``configs`` (train.yaml and the recipes) with the command line's ``args`` set, as
    each stage's bundle run reads them."""
    from monai.bundle import ConfigParser

    from app.bundle_args import _cli_options, _literal

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    for key, value in _cli_options(args).items():
        if value is not None:
            parser[key] = _literal(value)
    return parser


def _planned_loss(configs: Sequence[Path], args: Sequence[str]) -> Any:
    """The loss a stage trained now trains with, as its checkpoint will record it (:func:`app.losses.loss_settings`):
    the trainer's ``loss_function`` of the merged configuration. ``_NO_CHECKPOINT`` (nothing to compare) where it
    cannot be built here: the stage's own run reports why."""
    try:
        loss = _merged_config(configs, args).get_parsed_content("train#trainer#loss_function")
        from app.losses import loss_settings

        return loss_settings(loss)
    except Exception:  # noqa: BLE001 - a loss built only with what the stage provides is compared after it trains
        return _NO_CHECKPOINT


def _check_strategy_settings(configs: Sequence[Path], args: Sequence[str],
                             planned: Sequence[tuple[str, str, str | None]]) -> None:
    """Build each stage's strategy from the merged configuration before any stage trains.

    A strategy checks its settings when it is built (``--cggm_rho 0``, ``--gmd_sync x``), which each stage
    does only when its turn comes: ``plain,gmd,cggm --cggm_rho 0`` trained plain and gmd for their whole
    budgets before the cggm stage stopped.

    Raises:
        ValueError: the stage's label and the strategy's own message, which names the setting and its fix.
    """
    from app.bundle_args import _literal

    parser = _merged_config(configs, args)
    gmd_subsets = parser.get("gmd_subsets")
    quiet = logging.getLogger("app.strategies")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # an option meant for another stage is no news here; each stage's log says so
    try:
        for label, name, subsets in planned:
            parser["strategy"], parser["gmd_subsets"] = name, _literal(subsets) if subsets else gmd_subsets
            try:
                parser.get_parsed_content("strategy_def", lazy=False)
            except Exception as err:  # noqa: BLE001 - MONAI wraps the strategy's own error in a RuntimeError
                cause: BaseException | None = err
                while cause is not None and not isinstance(cause, ValueError):
                    cause = cause.__cause__
                if cause is not None:  # anything else (an expression the stage evaluates differently) is its own to report
                    raise ValueError(f"stage {label} of --strategies: {cause}") from None
    finally:
        quiet.setLevel(level)


def _stage_settings(bundle: Path, args: Sequence[str], out: Path, overrides: Sequence[Path] = ()) -> dict[str, Any]:
    """What decides a stage's result: the bundle, its override files (path and SHA-256 of the contents, so an
    edited recipe trains again) and its arguments, with paths inside ``out`` made relative."""
    root = os.path.realpath(out)

    def relative(arg: str) -> str:
        # a path-like value is recorded absolute (existing or not), so its spelling does not matter
        if arg.startswith("-") or (os.sep not in arg and not os.path.exists(arg)):
            return arg
        resolved = os.path.realpath(arg)
        return "<output_dir>" + resolved[len(root):] if resolved.startswith(root + os.sep) else resolved

    split: list[str] = []
    for arg in _without(args, "output_dir"):
        split += arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg]
    settings: dict[str, Any] = {"bundle": str(bundle.resolve()), "args": [relative(a) for a in split]}
    if overrides:  # only then: stages recorded without override files stay reusable
        settings["overrides"] = [{"path": os.path.realpath(f),
                                  "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()} for f in overrides]
    return settings


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is none (e.g. a stage run by an earlier version)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _unreadable(path: Path | None) -> bool:
    """Whether ``path`` exists but holds no complete JSON: an earlier version wrote the ablation's records
    in place, and a run killed during such a write left the file empty or cut short."""
    if path is None or not path.is_file():
        return False
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return True
    return False


def _reusable(result: Path, stamp: Path, settings: dict[str, Any], done: Path | None = None) -> bool:
    """Whether a finished stage's ``result`` can stand for this run; records ``settings`` when it cannot.

    Args:
        result: the file the stage makes (a checkpoint, a report).
        stamp: where the settings of the stage are recorded, before it runs.
        settings: this command's settings for the stage (:func:`_stage_settings`).
        done: a file written only once the stage has succeeded. Training writes ``model.pt`` at its
            first validation and MONAI's ``CheckpointSaver`` writes ``model_final.pt`` when training
            raises, so an interrupted or failed training leaves ``result`` behind: with ``done``
            given, a recorded stage counts as finished only when ``done`` exists too.

    A ``stamp`` or ``done`` that cannot be read (cut short by a kill while an earlier version wrote it in
    place) says nothing about how ``result`` was made, nor that the stage ended: the stage runs again,
    with a note, instead of the ablation stopping at ``Expecting value: line 1 column 1`` on every resume.
    The records are now written atomically, so a kill leaves the previous record or the new one.

    Raises:
        ValueError: ``result`` was produced with other settings, which a resumed ablation must not mix in.
    """
    damaged = [str(p) for p in (stamp, done) if _unreadable(p)]
    if damaged:
        print(f"note: {' and '.join(damaged)} cannot be read (a run was stopped while writing it): the stage runs "
              "again.", flush=True)
        recorded, finished = None, False
    else:
        recorded = _read_json(stamp)
        finished = result.is_file() and (done is None or recorded is None or done.is_file())
    if finished and recorded == settings:
        return True
    if finished and recorded is not None:
        raise ValueError(
            f"{result} was made with other settings than this command's (recorded in {stamp}: "
            f"{' '.join(recorded.get('args', []))}). Use a new output folder (--output_dir; bench/mosi_compare.py: "
            f"--out_dir), or delete {stamp.parent} "
            "to run that strategy again.")
    if finished:
        print(f"note: {result} has no record of its settings (an earlier version wrote it); "
              "it is reused as if made by this command.", flush=True)
    atomic_write_text(stamp, json.dumps(settings, indent=1))  # a kill leaves the previous record or this one
    return finished


def _only_hd95_differs(stamp: Path, settings: dict[str, Any]) -> bool:
    """Whether the evaluation recorded in ``stamp`` differs from ``settings`` in ``--hd95`` alone: the same model
    on the same cases, with or without the HD95 columns, which an evaluation adds without changing the Dice."""
    recorded = None if _unreadable(stamp) else _read_json(stamp)
    if not isinstance(recorded, dict) or recorded == settings:
        return False
    plain = [{**s, "args": _without(s.get("args", []), "hd95")} for s in (recorded, settings)]
    return plain[0] == plain[1]


def _split_cases(datalist: Path) -> dict[str, list[str]]:
    """The case ids a segmentation run trained and validated on, from its ``datalist.json``."""
    payload = _read_json(datalist) or {}
    return {part: sorted(str(r.get("case")) for r in payload.get(part) or []) for part in ("training", "validation")}


def _check_same_split(label: str, split: dict[str, list[str]], reference: tuple[str, dict[str, list[str]]],
                      out: Path) -> None:
    """Refuse a stage whose run split other cases than the stages before it (the data changed between them).

    Raises:
        ValueError: naming both stages, the cases that differ and the fix.
    """
    first, expected = reference
    if split == expected:
        return
    changes = []
    for part in ("training", "validation"):
        added, removed = sorted(set(split[part]) - set(expected[part])), sorted(set(expected[part]) - set(split[part]))
        if added or removed:
            changes.append(f"{part}: {len(added)} case(s) only in {label!r} {added[:3]}, "
                           f"{len(removed)} only in {first!r} {removed[:3]}")
    raise ValueError(
        f"Strategy {label!r} trained and is scored on other cases than {first!r} ({'; '.join(changes)}): the data "
        f"changed after {first!r} trained, so the two would not compare. Delete {out / first} (and every other "
        "stage trained before the change) to train it again on the current data, or use a new --output_dir.")


def _environment(bundle_args: Sequence[str]) -> dict[str, Any]:
    """Where a training stage ran: versions, CPU count and the device the bundle uses (its ``--device``
    override, else the first GPU when there is one, as ``train.yaml`` picks)."""
    import platform

    import monai
    import torch

    device = _option(bundle_args, "device")
    if device is None:
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "device": device, "cpu_count": os.cpu_count()}


def _iterations(log: Path, checkpoint: Path) -> int | None:
    """Iterations a training run did: from the time-limit handler's log line when the limit stopped it,
    else from its last training checkpoint (None when neither is there)."""
    stopped = _time_limit_stop(log)
    if stopped is not None:
        return stopped
    if not checkpoint.is_file():
        return None
    import torch

    try:
        # memory-mapped: only the count is read, not the weights and optimizer state
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a count for the table, not worth failing the ablation over
        return None
    return int(state["iteration"]) if isinstance(state, dict) and "iteration" in state else None


def _time_limit_stop(log: Path) -> int | None:
    """The iteration at which the time-limit handler stopped the training logged in ``log``, else None."""
    hits = re.findall(r"[Tt]ime limit.*?iteration (\d+)", log.read_text(encoding="utf-8", errors="replace")) if log.is_file() else []
    return int(hits[-1]) if hits else None


def _recover_finish_mark(out: Path, label: str, ckpt: Path, stamp: Path, seconds: Path, settings: dict[str, Any]) -> None:
    """Write ``seconds`` (the mark of a finished training stage) for a stage an earlier version finished.

    Versions of the runner before ``train_seconds.json`` (brats_gmd before 0.5.0) wrote the stage's settings and
    recorded its time in ``ablation.json`` only, so without this its finished training counted as interrupted and
    was trained again, replacing the models and reports the user came to tabulate. The mark is written only when
    the stage's settings are this command's, ``ablation.json`` lists the stage with this checkpoint (the ablation
    that trained it tabulated it) and the stage's log or training checkpoint shows the run ended: the trainer's
    completion line or the time limit's stop in its log, or every epoch's iterations done in the stage's
    ``checkpoint_last.pt``. Anything short of that is left to train again, as an interrupted stage.
    """
    if seconds.exists() or _unreadable(stamp) or _read_json(stamp) != settings or not ckpt.is_file():
        return
    table = out / "ablation.json"
    record = None if _unreadable(table) else ((_read_json(table) or {}).get("runs") or {}).get(label)
    # compared within the output folder (<label>/train/models/<name>), which may have moved since
    if not isinstance(record, dict) or Path(str(record.get("checkpoint"))).parts[-4:] != ckpt.parts[-4:]:
        return
    run_dir, log = ckpt.parent.parent, out / label / "train.log"
    # MONAI's CheckpointSaver logs this line when the trainer completes (its time limit included), not when it raises
    ended = _time_limit_stop(log) is not None or (
        log.is_file() and "Train completed, saved final checkpoint" in log.read_text(encoding="utf-8", errors="replace"))
    if not ended:
        import torch

        try:
            state = torch.load(run_dir / "models" / "checkpoint_last.pt", map_location="cpu", weights_only=True,
                               mmap=True)
            planned = int(state["epoch_length"]) * int(state["max_epochs"])
            ended = 0 < planned <= int(state["iteration"])
        except Exception:  # noqa: BLE001 - no readable proof that it ended: trained again, as an interrupted stage
            return
    if not ended:
        return
    train_s = record.get("train_seconds")
    atomic_write_text(seconds, json.dumps(train_s if isinstance(train_s, (int, float)) else None))
    print(f"note: {out / label} was trained by an earlier version, which did not mark finished stages; its "
          "log or checkpoint shows the training ran to its end, so it is reused.", flush=True)


#: what :func:`_trained_loss` gives for a stage without a training checkpoint: nothing to compare
_NO_CHECKPOINT = object()


def _trained_loss(checkpoint: Path) -> Any:
    """The loss a training stage trained with, as its checkpoint records it (``loss_config``, see
    :func:`app.losses.loss_settings`); None for a checkpoint written before the loss was recorded, and
    ``_NO_CHECKPOINT`` where there is no readable checkpoint."""
    if not checkpoint.is_file():
        return _NO_CHECKPOINT
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the resume of that stage reports a damaged file; nothing to compare here
        return _NO_CHECKPOINT
    return state.get("loss_config") if isinstance(state, dict) else _NO_CHECKPOINT


def _check_same_loss(label: str, loss: Any, reference: tuple[str, Any], out: Path, planned: bool = False) -> None:
    """Refuse a stage that trained (``planned``: would train) with another loss than the finished stage of
    ``reference`` (the bundle's ``train.yaml`` or the package changed between them, e.g. brats_gmd 0.6.0's
    per-region cross-entropy), or where only one of the two records its loss (one trained before the loss was
    recorded, with whatever loss its version had).

    Raises:
        ValueError: naming both stages, the settings that differ and the fix.
    """
    first, expected = reference
    if loss is _NO_CHECKPOINT or expected is _NO_CHECKPOINT or loss == expected:
        return
    if loss is None or expected is None:
        older = label if loss is None else first
        why = (f"{out / older} was trained by an earlier version, which recorded no loss: it may have trained with "
               "another one (brats_gmd before 0.6.0: MONAI's softmax cross-entropy)")
    else:
        keys = [k for k in dict.fromkeys([*expected, *loss]) if expected.get(k) != loss.get(k)]
        why = "; ".join(f"{k} {expected.get(k)!r} in {first!r}, {loss.get(k)!r} in {label!r}" for k in keys)
    raise ValueError(
        f"Strategy {label!r} {'would be' if planned else 'is'} trained with another loss than {first!r} ({why}): "
        f"the bundle's train.yaml or this package changed between them, so the two would not compare. Delete "
        f"{out / first} (and every other stage trained before the change) to train it again with the current loss, "
        "or use a new --output_dir.")


def _finished_losses(reference: tuple[str, Any] | None, out: Path, later: Sequence[str]) -> list[tuple[str, Any]]:
    """The finished stages a stage about to train must match in loss: ``reference`` (the first stage before it with
    a checkpoint) and each ``later`` stage that finished in an earlier run of the ablation."""
    found = [] if reference is None or reference[1] is _NO_CHECKPOINT else [reference]
    for label in later:
        if (out / label / "train_seconds.json").is_file():
            loss = _trained_loss(out / label / "train" / "models" / "checkpoint_last.pt")
            if loss is not _NO_CHECKPOINT:
                found.append((label, loss))
    return found


def _same_loss_as(reference: tuple[str, Any] | None, label: str, checkpoint: Path, out: Path) -> tuple[str, Any]:
    """Check the loss stage ``label`` trained with (its training ``checkpoint``) against ``reference``, the first
    stage with a checkpoint (:func:`_check_same_loss`), and return the reference for the stages after it."""
    loss = _trained_loss(checkpoint)
    if reference is None or reference[1] is _NO_CHECKPOINT:
        reference = (label, loss)
    _check_same_loss(label, loss, reference, out)
    return reference


@contextlib.contextmanager
def _locked_output_dir(out: Path) -> Iterator[None]:
    """Hold the kernel's lock on ``out`` (created if need be) while the ablation writes into it.

    Two ablations started on one folder (a job started twice) each recorded their own settings for the
    stages and evaluated, trained and tabulated into the same files, so a stage could be recorded with
    the other run's settings and later reused as such. The second one stops instead, before it writes.
    As for training, the lock is ``flock`` on the folder itself: no lock file, released when the process
    dies; where the folder cannot be locked the ablation runs unlocked.

    The folder is checked first (:func:`app.atomic.check_writable_folder`): a read-only place stopped the
    ablation with a ``PermissionError`` traceback, and an unexpanded ``~`` (``--output_dir=~/runs``) made a
    folder named ``~`` here, whose first bundle run then refused it.

    Raises:
        ValueError: ``out`` cannot be written, or another process holds the lock.
    """
    check_writable_folder(out, f"--output_dir {out}", write_fix="pass an --output_dir you can write to")
    with locked_folder(out, f"--output_dir {os.path.abspath(out)} is in use by another run that is still writing "
                            "into it (a job started twice?): wait for it to end, or pass another --output_dir "
                            "(bench/mosi_compare.py: --out_dir)."):
        yield


def run_ablation(
    bundle: str | os.PathLike,
    strategies: str | Sequence[str],
    output_dir: str | os.PathLike,
    max_epochs: int,
    time_limit_minutes: float | None = None,
    seed: int | None = None,
    checkpoint: str = "final",
    eval_split: str | None = None,
    metrics: Sequence[str] | None = None,
    bundle_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Train and evaluate every strategy, then write ``ablation.{json,md,png}`` into ``output_dir``.

    Args:
        bundle: bundle folder (``configs/train.yaml`` and ``configs/evaluate.yaml``).
        strategies: ``"plain,dropout,gmd,cggm"`` or a list; ``gmd:K`` samples K subsets per iteration.
        output_dir: where each strategy's runs and the tables go.
        max_epochs: epochs per strategy (with ``time_limit_minutes`` also bounding the wall clock).
        time_limit_minutes: equal wall-clock budget per strategy (0: none); ``None``: the recipes' (``--config_file``)
            ``time_limit_minutes``, else none.
        seed: the seed of every run (data split, initial weights, augmentation, strategy); ``None``: the recipes'
            ``seed``, else 0.
        checkpoint: ``final`` (the model at the end of the budget) or ``best`` (the bundle's
            key-metric checkpoint, selected on the validation data it is then scored on).
        eval_split: sentiment bundles: the split to score (default: the bundle's ``val_split``).
        metrics: table metrics (default: the bundle family's; for a sentiment bundle run with
            ``--task classification``, ``Acc`` and ``F1``).
        bundle_args: extra ``--key value`` overrides for both bundle commands; a ``--config_file`` among them
            names override files (recipes), placed after ``train.yaml`` in both commands.

    Raises:
        ValueError: a bad strategy list, setting, ``checkpoint`` or ``metrics`` (named in the message), before any
            run starts.
        RuntimeError: a training ended without writing the checkpoint to evaluate.
    """
    bundle = Path(bundle)
    layout = bundle_layout(bundle)
    check_counts(max_epochs=max_epochs)  # the first stage's training would refuse it, after the output folder was made
    _check_eval_split_applies(layout, eval_split)
    _check_stage_settings(bundle_args)
    train, evaluate = _configs(bundle)
    overrides = _override_files(bundle_args, train, evaluate)
    hd95 = _hd95_option(bundle_args, layout)
    # threads for the evaluations' HD95 searches: passed to them only (training has no such setting) and left out
    # of their records, as it changes no value: a finished evaluation is kept whatever it was
    hd95_workers = _option(bundle_args, "hd95_workers")
    if hd95_workers is not None:  # read as the bundle's command line reads it, so that the error quotes the same value
        check_hd95_workers(_cli_value(hd95_workers))
    bundle_args = _without(_without(_without(bundle_args, "config_file"), "hd95"), "hd95_workers")
    if checkpoint not in ("final", "best"):
        raise ValueError(f"checkpoint must be 'final' or 'best', got {checkpoint!r}.")
    planned = parse_strategies(strategies, layout.kind)  # a bad list is refused before any folder is made
    _check_subset_count(bundle_args, overrides, planned)
    _check_strategy_settings([train, *overrides], bundle_args, planned)
    config = {k: v for f in (train, *overrides) for k, v in _load_config(f).items()}  # the recipes' values win
    # every stage's command sets both, so a recipe's own (bundles/brats_gmd/configs/demo.yaml's 4-minute budget) was
    # replaced by the runner's defaults (no limit, seed 0) without a word: they are the defaults here
    time_limit_minutes, seed = _budget_and_seed(config, overrides, time_limit_minutes, seed)
    if layout is SENTIMENT:
        eval_split = eval_split or _option(bundle_args, "val_split") or config.get("val_split", "valid")
        _check_eval_split(_option(bundle_args, "data_path") or config.get("data_path"),
                          _option(bundle_args, "trust_pickle") or config.get("trust_pickle", False), eval_split,
                          _label_settings(bundle_args, config))
    default_metrics, known = layout.metrics, REPORT_METRICS[layout.kind]
    if layout is SENTIMENT and (_option(bundle_args, "task") or config.get("task")) == "classification":
        # the classification report has accuracy and F1 only, so the regression columns would stop the
        # ablation after every strategy has trained
        default_metrics = known = SENTIMENT_CLASSIFICATION_METRICS
    if hd95:
        default_metrics = (*default_metrics, *HD95_METRICS)
    else:
        known = tuple(m for m in known if m not in HD95_METRICS)
    metrics = list(metrics or default_metrics)
    unknown = [m for m in metrics if m not in known]
    if unknown:  # the tables are made after every strategy has trained: refused before any does
        needs = " (the HD95 columns need --hd95 true)" if set(unknown) & set(HD95_METRICS) else ""
        raise ValueError(f"--metrics {','.join(metrics)}: the reports of these runs have no {unknown}; choose among "
                         f"{','.join(known)}{needs}.")
    out = Path(output_dir)
    with _locked_output_dir(out):  # created here; one ablation at a time in it
        ckpt_name = "model_final.pt" if checkpoint == "final" else "model.pt"
        runs: dict[str, Any] = {}
        reports: dict[str, Any] = {}
        first_split: tuple[str, dict[str, list[str]]] | None = None  # segmentation: every stage on the same cases
        first_loss: tuple[str, Any] | None = None  # every stage trained with the same loss
        for stage, (label, name, subsets) in enumerate(planned, 1):
            run_dir, eval_dir = out / label / "train", out / label / "eval"
            train_args = [*bundle_args, "--output_dir", str(run_dir), "--strategy", name, "--seed", str(seed),
                          "--max_epochs", str(int(max_epochs)), "--time_limit_minutes", str(time_limit_minutes)]
            if subsets:
                train_args += ["--gmd_subsets", subsets]
            ckpt = run_dir / "models" / ckpt_name
            train_s = None
            # finished stages are kept, so an interrupted ablation resumes with the same command; a
            # different command (seed, budget, overrides) must not silently reuse them
            # train_seconds.json is written last, so it marks a training stage that ran to its end
            seconds = out / label / "train_seconds.json"
            settings = _stage_settings(bundle, train_args, out, overrides)
            _recover_finish_mark(out, label, ckpt, out / label / "train_settings.json", seconds, settings)
            trained_before = _interrupted_training(run_dir, out / label / "train_settings.json", settings, seconds)
            if not _reusable(ckpt, out / label / "train_settings.json", settings, seconds):
                seconds.unlink(missing_ok=True)
                # a finished stage trained before train.yaml's loss (or the package's) changed, or before losses were
                # recorded, would not compare with this one: refused now, not after this stage has trained for hours
                finished = _finished_losses(first_loss, out, [later for later, _, _ in planned[stage:]])
                if finished:
                    loss_now = _planned_loss([train, *overrides], train_args)
                    for reference in finished:
                        if loss_now is not _NO_CHECKPOINT:
                            _check_same_loss(label, loss_now, reference, out, planned=True)
                        elif reference[1] is None:  # a stage trained now records a loss, which that one did not
                            _check_same_loss(label, {}, reference, out, planned=True)
                # a stage trains for minutes to hours with its log in a file: say which one runs, and where it logs
                log = out / label / "train.log"
                if trained_before is None:
                    print(f"Training {label} (strategy {stage} of {len(planned)}); log: {log}", flush=True)
                    train_s = _run_bundle([train, *overrides], bundle, train_args, log)
                else:
                    checkpoint_last = run_dir / "models" / "checkpoint_last.pt"
                    print(f"Resuming the interrupted training of {label} (strategy {stage} of {len(planned)}) from "
                          f"{checkpoint_last}; log: {log}", flush=True)
                    # the log goes on after the interrupted run's; its time counts the time trained before the stop
                    train_s = trained_before + _run_bundle(
                        [train, *overrides], bundle, [*train_args, "--resume", "true"], log, append=True,
                        fix=f"To train {label} again from the start instead, delete {out / label}.")
                if not ckpt.is_file():
                    raise RuntimeError(f"Training {label!r} finished without writing {ckpt}; see {out / label / 'train.log'}.")
                atomic_write_text(out / label / "train_environment.json", json.dumps(_environment(bundle_args), indent=1))
                atomic_write_text(seconds, json.dumps(train_s))  # the stage's end: complete or absent, never cut short
            # a resumed ablation reuses finished stages: one trained before train.yaml's loss (or the package's)
            # changed would be tabulated beside stages trained with the new one
            first_loss = _same_loss_as(first_loss, label, run_dir / "models" / "checkpoint_last.pt", out)
            if layout is SEGMENTATION:
                # a resumed ablation reuses finished stages: if cases were added, removed or renamed since,
                # the new stages split other cases and each strategy would be scored on its own held-out set
                split = _split_cases(run_dir / "datalist.json")
                if first_split is None:
                    first_split = (label, split)
                _check_same_split(label, split, first_split, out)
                scored = ["--eval_datalist", str(run_dir / "datalist.json")]
            else:
                scored = ["--eval_split", eval_split]
            if train_s is None:
                print(f"Reusing the finished training of {label} (strategy {stage} of {len(planned)}): {ckpt}",
                      flush=True)
            eval_args = [*_without(bundle_args, scored[0][2:]), *scored, "--ckpt_path", str(ckpt),
                         "--output_dir", str(eval_dir), "--seed", str(seed)]
            if hd95:  # only then: the records of evaluations without it stay as they were, and are reused
                eval_args += ["--hd95", "true"]
            report_path = eval_dir / layout.report
            if train_s is not None and report_path.is_file():
                report_path.unlink()  # it scored the model just replaced
            elif _only_hd95_differs(out / label / "eval_settings.json",
                                    _stage_settings(bundle, eval_args, out, overrides)) and report_path.is_file():
                # the same model scored with(out) HD95: scored again, not refused as another run would be
                report_path.unlink()
            elif report_path.is_file() and not (out / label / "eval_settings.json").exists():
                # only the runners of brats_gmd before 0.3.0 (and of the mosi_gmd 0.2.0 beside them) left a report
                # without the record this runner writes before evaluating, and their evaluators scored otherwise: the
                # segmentation one decoded only the first sliding window of each batch, the sentiment one counted a
                # 0 label as positive in Acc2_has0. The model is kept; scoring it again takes minutes, not hours
                print(f"note: {report_path} was scored by an earlier version, whose evaluator gave other values: "
                      f"{label} is scored again.", flush=True)
                report_path.unlink()
            if not _reusable(report_path, out / label / "eval_settings.json",
                             _stage_settings(bundle, eval_args, out, overrides)):
                threads = ["--hd95_workers", hd95_workers] if hd95 and hd95_workers is not None else []
                print(f"Evaluating {label}; log: {out / label / 'eval.log'}", flush=True)
                _run_bundle([train, *overrides, evaluate], bundle, [*eval_args, *threads], out / label / "eval.log")
            reports[label] = json.loads(report_path.read_text(encoding="utf-8"))
            if train_s is None:  # a reused stage: its time was recorded when it trained
                train_s = _read_json(seconds)
            runs[label] = {"strategy": name, "gmd_subsets": subsets, "train_seconds": train_s,
                           "iterations": _iterations(out / label / "train.log", run_dir / "models" / "checkpoint_last.pt"),
                           "checkpoint": str(ckpt),
                           "report": str(report_path), "environment": _read_json(out / label / "train_environment.json")}
            print(json.dumps({"strategy": label, **runs[label]}), flush=True)
        table = ablation_table(reports, metrics)
        table["runs"] = runs
        table["settings"] = {"bundle": str(bundle), "seed": seed, "max_epochs": int(max_epochs),
                             "time_limit_minutes": time_limit_minutes, "checkpoint": checkpoint,
                             "bundle_args": list(bundle_args), "config_files": [str(f) for f in overrides],
                             "hd95": hd95}
        title = f"Ablation of {bundle.name}: seed {seed}, {_budget(max_epochs, time_limit_minutes)} per strategy, " \
                f"{checkpoint} model"
        write_ablation_report(table, out, title)
        print(format_ablation_markdown(table, title), flush=True)
        return table


def run_ablation_seeds(
    bundle: str | os.PathLike,
    strategies: str | Sequence[str],
    output_dir: str | os.PathLike,
    max_epochs: int,
    seeds: Sequence[int],
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`run_ablation` at every seed (in ``output_dir/seed_<s>``), then the spread over seeds.

    ``kwargs`` go to :func:`run_ablation` unchanged. Writes ``output_dir/ablation_seeds.{json,md}``
    (:func:`app.reports.ablation.seed_table`) and returns that table, with each seed's table under
    ``"per_seed"``.

    Raises:
        ValueError: ``seeds`` is empty or repeats a seed, and as :func:`run_ablation`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}.")
    planned = parse_strategies(strategies, bundle_layout(bundle).kind)  # refused before the first seed trains
    _check_eval_split_applies(bundle_layout(bundle), kwargs.get("eval_split"))
    _check_stage_settings(kwargs.get("bundle_args", ()))
    args = kwargs.get("bundle_args", ())
    _check_subset_count(args, _override_files(args, *_configs(Path(bundle))), planned)  # and before out is made
    out = Path(output_dir)
    with _locked_output_dir(out):  # each seed's run_ablation locks its own seed_<s> folder too
        per_seed: dict[int, Any] = {}
        first_loss: tuple[str, Any] | None = None
        for s in seeds:
            per_seed[s] = run_ablation(bundle, strategies, out / f"seed_{s}", max_epochs, seed=s, **kwargs)
            # each seed's stages trained with one loss; a seed finished before the loss changed would still be
            # averaged with the others
            for label in per_seed[s]["runs"]:
                stage = f"seed_{s}/{label}"
                checkpoint = out / stage / "train" / "models" / "checkpoint_last.pt"
                first_loss = _same_loss_as(first_loss, stage, checkpoint, out)
        table = seed_table(per_seed)
        minutes = per_seed[seeds[0]]["settings"]["time_limit_minutes"] or 0  # given, or the recipes'
        title = f"Ablation of {Path(bundle).name} over {len(seeds)} seeds: {_budget(max_epochs, minutes)} per strategy"
        write_seed_report(table, out, title)
        print(format_seed_markdown(table, title), flush=True)
        return {**table, "per_seed": per_seed}


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers such as 0,1,2, got {text!r}.")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m app ablate``; options it does not know go to both bundle commands. Returns 0, or 1
    with one line on stderr (a failed stage, a bad setting, or a file it could not write)."""
    parser = argparse.ArgumentParser(
        prog="python -m app ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/brats_gmd")
    parser.add_argument("--strategies", required=True, help="comma-separated, e.g. plain,dropout,gmd,cggm")
    parser.add_argument("--max_epochs", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--time_limit_minutes", type=float, default=None,
                        help="wall-clock budget per strategy (default: a recipe's time_limit_minutes, else none)")
    seeding = parser.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=None, help="default: a recipe's seed, else 0")
    seeding.add_argument("--seeds", type=_seed_list, default=None,
                         help="comma-separated seeds: repeat the ablation at each (e.g. 0,1,2)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final")
    parser.add_argument("--eval_split", default=None,
                        help="sentiment bundles only: split to score (default: valid)")
    parser.add_argument("--metrics", default=None, help="comma-separated table metrics (default: the bundle's; Acc,F1 "
                        "for a sentiment --task classification)")
    args, bundle_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if bundle_args and bundle_args[0] == "--":
        bundle_args = bundle_args[1:]
    options = {"time_limit_minutes": args.time_limit_minutes, "checkpoint": args.checkpoint,
               "eval_split": args.eval_split, "metrics": args.metrics.split(",") if args.metrics else None,
               "bundle_args": bundle_args}
    try:
        if args.seeds:
            run_ablation_seeds(args.bundle, args.strategies, args.output_dir, args.max_epochs, args.seeds, **options)
        else:
            run_ablation(args.bundle, args.strategies, args.output_dir, args.max_epochs, seed=args.seed, **options)
    except (RuntimeError, ValueError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

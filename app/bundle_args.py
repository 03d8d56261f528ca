"""The command line of ``python -m monai.bundle run``, checked against the bundle's settings.

MONAI adds an unknown ``--key`` to the config as a new, unused entry, so a misspelt override is
silently ignored and the run uses the default; the same holds for a misspelt key of an override file
passed after ``train.yaml`` (:func:`check_override_files`). Training, evaluation and batch inference
alike call :func:`check_overrides` first. This module needs no engine: the inference image imports it too.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import os
import re
import sys
from typing import AbstractSet, Any, Mapping, Sequence

import monai

from app.data.errors import check_regular_file

__all__ = ["argument_flags", "check_overrides", "check_override_files", "ckpt_export_file", "config_files"]

_MONAI_DIR = os.path.dirname(os.path.abspath(monai.__file__)) + os.sep

logger = logging.getLogger(__name__)

# the arguments of ``monai.bundle run`` itself; every other ``--key`` is a config override
_RUN_ARGS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                       "args_file"})
# ids that ``monai.bundle run`` reads itself: an override file may add them although no setting names them
_WORKFLOW_IDS = frozenset({"imports", "initialize", "run", "finalize", "bundle_root", "_meta_", "_requires_"})
# a reference to another id (``@id``, ``@id#key``, ``$@id.method()``) or a macro (``%id``): the id it names
_REFERENCE = re.compile(r"[@%]([A-Za-z_][\w#:]*)")


def _cli_options(args: Sequence[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line, keys as Fire
    reads them (``-`` becomes ``_``)."""
    options: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or len(arg) == 2:
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq and i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        options[key.replace("-", "_")] = value if (eq or value) else None
    return options


def ckpt_export_file(argv: Sequence[str] | None = None) -> str | None:
    """The ``--ckpt_file`` of a running ``python -m monai.bundle ckpt_export`` command, else None.

    MONAI's exporter builds the network from the config first and loads ``--ckpt_file`` into it afterwards,
    without passing that path to the config. A network whose widths come from a checkpoint (the brats bundle's
    ``export_network``) then read them from its own ``ckpt_path`` setting: ``ckpt_export --ckpt_file F`` alone,
    as MONAI documents it, stopped with a traceback when ``<bundle_root>/models/model.pt`` did not exist, and
    failed to load ``F`` when that file had other widths. Only the command line is seen (``sys.argv``, and an
    ``--args_file`` it names); an in-process ``monai.bundle.ckpt_export(...)`` call is not.

    Args:
        argv: the command line; None for ``sys.argv``.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "ckpt_export":
        return None
    if not os.path.abspath(argv[0]).startswith(os.path.join(_MONAI_DIR, "bundle") + os.sep):
        return None
    options: dict[str, Any] = _cli_options(argv[2:])
    if options.get("args_file"):  # defaults from a file, the command line wins
        _check_recipe_file(options["args_file"], "--args_file")
        options = {**ConfigParser.load_config_file(options["args_file"]), **options}
    value = options.get("ckpt_file")
    return None if value is None else str(value)


def _check_recipe_file(path: Any, setting: str) -> None:
    """Refuse a named pipe, device or socket given as ``setting`` (a recipe or ``--args_file``) before MONAI
    opens it: reading a pipe waits for a writer forever, so the run hung without a word.

    Raises:
        CaseError: a ``ValueError`` naming the path, what it is and the fix.
    """
    check_regular_file(str(path), f"Pass a YAML or JSON file as {setting}.")


def _bundle_command(argv: Sequence[str] | None) -> tuple[dict[str, Any], Any] | None:
    """``(options, config_file)`` of a ``python -m monai.bundle`` command line (``sys.argv`` when ``argv`` is
    None; ``--args_file`` read in, the command line winning), its files checked as files; None for any other
    command, one without ``--config_file``, or a malformed list of files (MONAI reports it itself)."""
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not os.path.abspath(argv[0]).startswith(os.path.join(_MONAI_DIR, "bundle") + os.sep):
        return None
    options: dict[str, Any] = _cli_options(argv[1:])
    if options.get("args_file"):  # defaults and overrides from a file, the command line wins
        _check_recipe_file(options["args_file"], "--args_file")
        options = {**ConfigParser.load_config_file(options["args_file"]), **options}
    config_file: Any = options.get("config_file")
    if not config_file:
        return None
    if isinstance(config_file, str) and config_file.lstrip().startswith("["):
        try:
            config_file = config_files(config_file)
        except ValueError:
            return None
    for path in config_files(config_file):
        _check_recipe_file(path, "--config_file")
    return options, config_file


def argument_flags(component: str, argv: Sequence[str] | None = None) -> dict[str, str] | None:
    """The flag that sets each argument of ``component`` (``strategy_def``) in this ``python -m monai.bundle`` run.

    ``--gmd_subsets`` where the config files wire the argument to that setting (``subsets: '@gmd_subsets'``),
    else ``--strategy_def#subsets``: a recipe that sets the argument itself (or a whole ``strategy_def`` of its
    own) cuts it off from the setting, so that :func:`check_overrides` refuses ``--gmd_subsets`` there, and an
    argument the command line sets (``--strategy_def#subsets 5``) is that flag's to change. An argument the
    config leaves out takes ``--strategy_def#NAME`` too (the key is not listed: callers default to it).

    Returns:
        ``{"subsets": "--gmd_subsets", "alpha": "--strategy_def#alpha", ...}``, or None outside a bundle
        command line (``sys.argv`` when ``argv`` is None), where the config files are not known.
    """
    from monai.bundle import ConfigParser

    command = _bundle_command(argv)
    if command is None:
        return None
    options, config_file = command
    entry = _config_at(ConfigParser.load_config_files(config_file), component)
    if not isinstance(entry, dict):
        return None
    set_here = {key.replace("::", "#")[len(component) + 1:] for key in options
                if key.replace("::", "#").startswith(component + "#")}
    flags = {}
    for name, value in entry.items():
        if name in _NON_ARG_KEYS:
            continue
        wired = re.fullmatch(r"\s*@(\w+)\s*", value) if isinstance(value, str) else None
        flags[str(name)] = f"--{wired.group(1)}" if wired and name not in set_here else f"--{component}#{name}"
    return flags


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``--key`` of ``python -m monai.bundle run`` that names no setting of the config files.

    MONAI adds an unknown key to the config as a new, unused entry, so a misspelt override
    (``--patch_sizes``, ``--max_epoch``) is silently ignored and the run uses the default: a
    reproduced table then quietly differs. Only the command line of ``python -m monai.bundle``
    (``sys.argv``, also under ``torchrun``) is checked; an in-process ``monai.bundle.run(...)`` is
    not, since its keywords cannot be told apart from the config here.

    The override files among ``--config_file`` are checked too (:func:`check_override_files`), and so is
    every argument of a component (a ``_target_`` entry) that the command line or an override file sets:
    the component's class or function must take it.

    Raises:
        ValueError: names the unknown key, the close settings and the config files.
    """
    from monai.bundle import ConfigParser

    command = _bundle_command(argv)
    if command is None:
        return
    options, config_file = command
    merged = ConfigParser.load_config_files(config_file)
    check_override_files(config_file, merged)
    known = set(merged) | {"_meta_"}
    for key in options:
        top = re.split(r"::|#", key, maxsplit=1)[0]
        if key in _RUN_ARGS or top in known:
            continue
        close = difflib.get_close_matches(top, sorted(known), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "check its spelling."
        files = config_file if isinstance(config_file, str) else ", ".join(map(str, config_file))
        elsewhere = _sibling_configs_with(top, config_files(config_file))
        if elsewhere:  # the exact key in another file of the bundle beats a close spelling
            hint = (f"it is a setting of {' and '.join(elsewhere)} in the same folder, not of the files given: add "
                    "that file to --config_file or use it instead.")
        else:
            hint = _other_bundle_hint(top, config_files(config_file)) or hint
        raise ValueError(f"--{key} is not a setting of {files}: {hint} The run would ignore it and use the default; "
                         "the settings are the top-level keys of those files.")
    # a setting this command never reads (--ckpt_path in training: evaluate.yaml's; --eval_split in sentiment
    # training): the run goes on as if it had not been given, so say so
    read = _referenced_ids(merged)  # a value no setting reads (train.yaml's bundle_root) may keep its '#'
    # what the command builds: the ids its workflow steps reach. Evaluation merges train.yaml, whose training
    # sections read --max_epochs or --learning_rate, but never builds them
    run = _reached_ids(merged, [str(options.get(k) or d) for k, d in
                                (("init_id", "initialize"), ("run_id", "run"), ("final_id", "finalize"))])
    used = (run or read) | _WORKFLOW_IDS
    for key, value in options.items():
        if key not in _RUN_ARGS and value is not None and re.split(r"::|#", key, maxsplit=1)[0] in read:
            _check_hash(_literal(value), f"--{key} {value}")
            _check_shell_text(_literal(value), f"--{key}", merged)
    for key in options:
        top = re.split(r"::|#", key, maxsplit=1)[0]
        if key not in _RUN_ARGS and top not in used:
            files = config_file if isinstance(config_file, str) else ", ".join(map(str, config_file))
            readers = sorted(k for k, v in merged.items() if k != top and top in _referenced_ids(v))
            if key != top:  # an entry of a section (--train#handlers#0#print_lr) that the command never builds
                why = f"it does not build {top!r}"
            elif readers:  # training's settings, read by sections that an evaluation never builds
                why = (f"only {' and '.join(map(repr, readers))} refer{'s' if len(readers) == 1 else ''} to it, which it "
                       "does not run")
            else:
                why = "no setting refers to it"
            logger.warning("--%s is a setting of %s that this command does not use (%s): it has no effect here.", key,
                           files, why)
    # a component's arguments, set on the command line (--loss#lambda_ce 0.5) or by an override file
    # (component id, argument, where it was set, whether a later file may have replaced it since)
    touched: list[tuple[str, str, str, bool, Any]] = []  # ... and the value set
    for key, given in options.items():
        if key not in _RUN_ARGS:
            parent, _, name = key.rpartition("#") if "#" in key else key.rpartition("::")
            if parent:
                touched.append((parent, name, f"--{key}", False, _literal(given) if given is not None else None))
    for path in config_files(config_file)[1:]:
        for key, value in ConfigParser.load_config_file(path).items():
            parent, _, name = key.rpartition("#") if "#" in key else key.rpartition("::")
            if parent:
                touched.append((parent, name, f"{key!r} in {path}", True, value))
            if isinstance(value, dict) and "_target_" in value:
                touched += [(key, arg, f"{arg!r} under {key!r} in {path}", True, v) for arg, v in value.items()]
    cli_targets = {k.rpartition("#")[0]: v for k, v in options.items() if k.endswith("#_target_")}
    referenced = {r.replace("::", "#") for r in _referenced_paths(merged)}
    for parent, name, where, from_file, value in touched:
        component = _config_at(merged, parent)
        if from_file and not (isinstance(component, dict) and name in component):
            continue  # a later file replaced the component: the argument is not used
        if (not from_file and isinstance(component, dict) and "_target_" not in component and name not in component
                and not any(r == f"{parent}#{name}" or r.startswith(f"{parent}#{name}#") for r in referenced)):
            # a new entry in a plain section (--train#dataloder): MONAI adds it, and nothing reads it
            close = difflib.get_close_matches(name, [str(k) for k in component], n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(f'--{parent}#{c}' for c in close)}?" if close else "check its spelling."
            raise ValueError(f"{where} is not a setting of {parent!r}: {hint} The run would ignore it and use the "
                             "default.")
        _check_component_argument(merged, parent, name, where, cli_targets.get(parent), value)
    _check_recipe_keeps_references(config_files(config_file), options)


def _check_recipe_keeps_references(files: Sequence[str], options: Mapping[str, Any]) -> None:
    """Refuse a ``--key`` that an override file has cut off from the entry that reads it.

    ``train.yaml`` wires each top-level setting into its components (``strategy_def: {subsets:
    '@gmd_subsets'}``). An override file that sets the component's entry itself (``strategy_def#subsets:
    3``, or a whole new ``strategy_def``) drops that reference, so ``--gmd_subsets 5`` on the command line
    (or ``ablate``'s ``gmd:5``) was silently ignored and the run used the file's value.

    Raises:
        ValueError: naming the setting, the file and the entry that replaced it, and the fix.
    """
    from monai.bundle import ConfigParser

    given = {re.split(r"::|#", key, maxsplit=1)[0] for key in options if key not in _RUN_ARGS}
    if len(files) < 2 or not given:
        return
    earlier = ConfigParser.load_config_file(files[0])
    shipped = os.path.dirname(os.path.abspath(files[0]))
    for position, path in enumerate(files[1:], start=1):
        content = ConfigParser.load_config_file(path)
        # the bundle's own override files (evaluate.yaml, multi_gpu_train.yaml) replace entries by design;
        # a setting they stop reading gets the "does not use" warning instead
        recipe = os.path.dirname(os.path.abspath(path)) != shipped
        for key, value in content.items() if recipe else ():
            replaced = _config_at(earlier, key)
            if replaced is None:
                continue
            lost = _direct_references(replaced) - {re.split(r"::|#", ref)[0] for ref in _referenced_paths(value)}
            for top in sorted(lost & given):
                raise ValueError(
                    f"--{top} would be ignored: {path} sets {key!r} itself, which {files[0]} fills from '@{top}', so "
                    f"the run would use the file's value. Set '{top}' in {path} instead of {key!r}, or leave --{top} "
                    "out.")
        earlier = ConfigParser.load_config_files(list(files[:position + 1]))


def _direct_references(entry: Any) -> set[str]:
    """Top-level settings an entry is wired to: ``'@name'`` itself, or a component's ``arg: '@name'``
    (expressions and lists, such as ``initialize``, are not a setting's wiring and are left out)."""
    values = entry.values() if isinstance(entry, dict) else [entry]
    return {m.group(1) for v in values if isinstance(v, str) and (m := re.fullmatch(r"\s*@(\w+)\s*", v))}


def _referenced_paths(config: Any, found: set[str] | None = None) -> set[str]:
    """The full ids that the values of ``config`` refer to (``@train#checkpoint``, ``$...@id...``, ``%id::key``)."""
    found = set() if found is None else found
    if isinstance(config, dict):
        for value in config.values():
            _referenced_paths(value, found)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _referenced_paths(value, found)
    elif isinstance(config, str):
        found.update(_REFERENCE.findall(config))
    return found


def _reached_ids(config: dict, roots: Sequence[str]) -> set[str]:
    """The top-level ids that a run of ``config`` builds: ``roots`` (its workflow steps, ``initialize``, ``run``,
    ``finalize``) and every id their values refer to, followed from reference to reference. Empty when the config
    has none of ``roots``."""
    seen: set[str] = set()
    todo = [r for r in roots if _config_at(config, r) is not None]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        node = _config_at(config, path)
        if node is not None:
            todo.extend(ref.replace("::", "#") for ref in _referenced_paths(node))
    return {re.split(r"::|#", path, maxsplit=1)[0] for path in seen}


def _referenced_ids(config: Any) -> set[str]:
    """The top-level ids that the values of ``config`` refer to."""
    return {re.match(r"\w*", path).group(0) for path in _referenced_paths(config)}


#: what a setting of one of the product's bundles is done with in the other, for a user who carries it over (the
#: settings named here are the other bundle's; tests/test_bundle_args.py checks that they are)
_COUNTERPARTS = {
    # brats_gmd's settings, given to mosi_gmd
    "epoch_length": "a sentiment epoch is one pass over the training split (a segmentation epoch may be a count of "
                    "iterations); set the training's length with --max_epochs or --time_limit_minutes",
    "dataset_dir": "the sentiment features are one file, given as --data_path (an MMSA .pkl or a converted .npz)",
    "eval_datalist": "an evaluation scores the --eval_split of the --data_path file",
    "val_fraction": "the splits are the file's own: --train_split, --val_split and --eval_split name them",
    "features": "the sentiment network's size is set by --hidden, --encoder_layers and --trunk_layers",
    "patch_size": "an utterance is read whole; --batch_size and --val_batch_size set the utterances per batch",
    # mosi_gmd's settings, given to brats_gmd
    "data_path": "the segmentation cases are a folder, given as --dataset_dir",
    "eval_split": "an evaluation scores --eval_datalist (a training's datalist.json) or the cases under --dataset_dir",
    "train_split": "training splits the cases under --dataset_dir itself, by --val_fraction and --seed",
    "val_split": "training splits the cases under --dataset_dir itself, by --val_fraction and --seed",
    "hidden": "the segmentation network's widths are set by --features",
    "num_threads": "its CPU threads are set by the OMP_NUM_THREADS environment variable (OMP_NUM_THREADS=1 python -m "
                   "monai.bundle run ...)",
}


def _other_bundle_hint(key: str, files: Sequence[str]) -> str | None:
    """The hint for ``key`` when it is a setting of another bundle beside the one of ``files`` (its spelling is
    right, so "did you mean" or "check its spelling" would mislead), with what this bundle does instead; else None."""
    other = _other_bundles_with(key, files)
    if not other:
        return None
    return (f"it is a setting of another bundle, {' and '.join(other)}, not of this one"
            f"{': ' + _COUNTERPARTS[key] if key in _COUNTERPARTS else ''}.")


def _other_bundles_with(key: str, files: Sequence[str]) -> list[str]:
    """The other bundles beside the one of ``files[0]`` (``bundles/brats_gmd`` beside ``bundles/mosi_gmd``) whose
    configs define ``key`` at the top, each as the path of its folder (``bundles/NAME``).

    A setting of the segmentation bundle given to the sentiment one (``--epoch_length``), or the other way round
    (``--data_path``), is spelt right: "check its spelling", or a close setting of this bundle (``--patch_size``: "did
    you mean --batch_size?"), sent the user the wrong way.
    """
    configs = os.path.dirname(os.path.abspath(files[0]))
    if os.path.basename(configs) != "configs":  # a recipe or config outside a bundle: no bundles beside it
        return []
    here = os.path.dirname(configs)
    parent = os.path.dirname(here)
    found = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        bundle = os.path.join(parent, name)
        if bundle != here and _configs_defining(key, os.path.join(bundle, "configs")):
            found.append(os.path.relpath(bundle))
    return found


def _sibling_configs_with(key: str, files: Sequence[str]) -> list[str]:
    """Names of the other config files beside the first of ``files`` that define ``key`` at the top.

    A setting of one command is often tried on another (``--resume`` of the sentiment bundle's
    ``multi_gpu_train.yaml`` on its ``train.yaml``): "check its spelling" would send the user the wrong way.
    """
    folder = os.path.dirname(os.path.abspath(files[0]))
    return _configs_defining(key, folder, skip={os.path.abspath(f) for f in files})


def _configs_defining(key: str, folder: str, skip: AbstractSet[str] = frozenset()) -> list[str]:
    """Names of the config files in ``folder`` (not ``metadata.json``, nor the paths in ``skip``) that define ``key``
    at the top; none where ``folder`` is not one."""
    from monai.bundle import ConfigParser

    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if path in skip or name == "metadata.json" or not name.endswith((".yaml", ".yml", ".json")):
            continue
        try:
            content = ConfigParser.load_config_file(path)
        except Exception:  # not a config this check can read: it cannot name the setting either
            continue
        if isinstance(content, dict) and key in content:
            found.append(name)
    return found


def config_files(config_file: Any) -> list[str]:
    """The files of a ``--config_file`` value, read as MONAI reads it: a list (or its text,
    ``"['train.yaml','recipe.yaml']"``), one file, or paths joined by commas.

    Raises:
        ValueError: the text of a list is not one (``ast.literal_eval`` cannot read it).
    """
    if isinstance(config_file, str):
        text = config_file.strip()
        if text.startswith("["):
            try:
                config_file = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"--config_file {config_file!r} is not a list of files.") from None
        elif not os.path.isfile(text) and "," in text:
            return [f.strip() for f in text.split(",")]
        else:
            return [config_file]
    return [str(f) for f in config_file]


def check_override_files(config_file: Any, merged: dict | None = None) -> None:
    """Refuse a top-level key of an override file that the files before it lack and nothing reads.

    A recipe such as ``bundles/brats_gmd/configs/demo.yaml`` changes settings of the ``train.yaml`` before it; MONAI
    adds a key it does not know (``learning_rat: 0.01``) as a new, unused entry, so the run silently trains with
    the default. An override file may still add a new id that something refers to (``gmd_sync`` in
    ``multi_gpu_train.yaml``, read as ``@gmd_sync``; a ``_target_`` component referenced from another
    setting), and the ids ``monai.bundle run`` reads itself (``initialize``, ``run``, ``finalize``, ...).

    Args:
        config_file: the ``--config_file`` value: one file, a list of files, or paths joined by commas.
        merged: the files merged by ``ConfigParser.load_config_files``, when the caller has them.

    Raises:
        ValueError: naming the key, its file, the settings it resembles and the fix.
    """
    from monai.bundle import ConfigParser

    files = config_files(config_file)
    if len(files) < 2:
        return
    merged = ConfigParser.load_config_files(files) if merged is None else merged
    used = _referenced_ids(merged) | _WORKFLOW_IDS
    earlier = set(ConfigParser.load_config_file(files[0]))
    for position, path in enumerate(files[1:], start=1):
        content = ConfigParser.load_config_file(path)
        for key, value in content.items():
            _check_hash(value, f"{key!r} in {path}")
        tops = [re.split(r"::|#", key, maxsplit=1)[0] for key in content]
        for top in tops:
            if top in earlier or top in used:
                continue
            close = difflib.get_close_matches(top, sorted(earlier), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "check its spelling."
            hint = _other_bundle_hint(top, files) or hint
            raise ValueError(
                f"{top!r} in {path} is not a setting of {', '.join(files[:position])} and no setting refers to it: "
                f"{hint} The run would ignore it and use the default. Fix the key in {path}, or refer to a new "
                f"setting from the one that should use it (@{top})."
            )
        earlier.update(tops)


def _literal(text: str) -> Any:
    """A command-line value as python-fire hands it to the config: a Python literal when it is one
    (``"[32,32,32]"``, ``"['a','b']"``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _check_hash(value: Any, where: str) -> None:
    """Refuse a plain text value (a path, a name) that holds ``#``.

    MONAI reads ``#`` as its old id separator everywhere in a config, values included, and replaces it
    with ``::`` in every text value it resolves: ``--output_dir /data/site#1/out`` wrote the whole run into
    ``/data/site::1/out`` without a word, and ``--dataset_dir /data/case#1`` was reported missing as
    ``/data/case::1``. References (``@id#key``), expressions (``$...``) and macros (``%...``) use ``#``
    as MONAI means it and are left alone.

    Raises:
        ValueError: naming where the value was set, the path MONAI would use instead and the fix.
    """
    if isinstance(value, dict):
        for item in value.values():
            _check_hash(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_hash(item, where)
    elif isinstance(value, str) and "#" in value and not value.lstrip().startswith(("$", "@", "%")):
        raise ValueError(f"{where}: MONAI's config syntax reads '#' in a setting's value as an id separator and "
                         f"turns {value!r} into {value.replace('#', '::')!r}, so the run would read or write another "
                         "path than the one given. Rename the folder or file without '#', or give a symbolic link "
                         "to it whose path has none (ln -s).")


# a value that starts as a shell variable would ($HOME/runs, ${SCRATCH}/x): MONAI evaluates it as Python
_SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?(?=/|$)")


def _check_shell_text(value: Any, option: str, config: dict) -> None:
    """Refuse a command-line value that the shell left unexpanded and MONAI would read as its own syntax.

    A job script that quotes ``'$HOME/runs/x'`` (single quotes), or a scheduler that passes the text as
    it is, handed MONAI a value starting with ``$``, which it evaluates as Python: the run stopped with
    ``NameError: name 'HOME' is not defined`` at the bottom of a traceback. A relative path that starts
    with ``@`` and is nothing more (``@site``) is read as a reference to a setting, and stopped with
    MONAI's traceback too.

    Raises:
        ValueError: naming the option, what MONAI would make of the value and the fix.
    """
    if not isinstance(value, str):
        return
    text = value.strip()
    match = _SHELL_VARIABLE.match(text)
    if match and match.group(1) in os.environ:
        raise ValueError(f"{option} {value}: the shell did not expand ${match.group(1)} (single quotes, or a value "
                         "passed on as text), and MONAI evaluates a value starting with '$' as Python. Let the shell "
                         f"expand it (double quotes: {option} \"${match.group(1)}{text[match.end():]}\"), or give "
                         f"the path itself ({os.environ[match.group(1)]}{text[match.end():]}).")
    if re.fullmatch(r"@[\w#:]+", text) and _config_at(config, text[1:]) is None:
        raise ValueError(f"{option} {value}: MONAI reads a value that is '@' and a name as a reference to another "
                         f"setting, and there is no setting {text[1:]!r}. For a file or folder named {text}, write "
                         f"{option} ./{text}.")


# keys of a component that MONAI reads itself and never passes to it
_NON_ARG_KEYS = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})


def _config_at(config: Any, path: str) -> Any:
    """The entry of ``config`` at an id such as ``train#handlers#2`` (``::`` too), or None."""
    node = config
    for part in re.split(r"::|#", path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _tensor_only(annotation: Any) -> bool:
    """Whether a parameter's annotation (a type, or its text under ``from __future__ import annotations``) admits a
    torch tensor and nothing a config can write as a literal: ``torch.Tensor | None``, ``Optional[Tensor]``."""
    text = annotation if isinstance(annotation, str) else str(annotation)
    text = re.sub(r"^(typing\.)?Optional\[(.*)\]$", r"\2", text.strip())
    kinds = {part.strip() for part in text.split("|")} - {"None", "NoneType"}
    return bool(kinds) and kinds <= {"torch.Tensor", "Tensor", "<class 'torch.Tensor'>"}


def _check_component_argument(config: dict, path: str, name: str, where: str, target: Any = None,
                              value: Any = None) -> None:
    """Refuse ``name`` as an argument of the component at ``path`` when its class or function takes no such
    argument (and no ``**kwargs``), or takes it as a torch tensor only and ``value`` is a list or a number.

    MONAI would stop only when it builds the component, with a traceback, often after every case has
    been read and ``datalist.json`` written; a loss, optimizer or network variant set in an override
    file or with ``--loss#lambda_ce`` is checked here instead, before any work. MONAI's own ``DiceCELoss``
    (``--loss#_target_ monai.losses.DiceCELoss --loss#weight "[1,1,2]"``) and torch's losses register ``weight`` as a
    buffer, which takes a tensor only: every list or number stopped the run with ``cannot assign 'list' object to
    buffer 'weight'`` at the bottom of a traceback.

    Raises:
        ValueError: naming where the argument was set, the component, the arguments it resembles and the fix.
    """
    from monai.bundle.config_item import ComponentLocator, ConfigComponent
    from monai.utils.module import locate

    component = _config_at(config, path)
    if name in _NON_ARG_KEYS or not isinstance(component, dict):
        return
    target = component.get("_target_") if target is None else target
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return
    try:
        module_name = ConfigComponent({"_target_": target}, locator=ComponentLocator()).resolve_module_name()
        callable_ = locate(module_name) if isinstance(module_name, str) else module_name
        params = inspect.signature(callable_).parameters
    except Exception:  # noqa: BLE001 - a target that cannot be found or read is for MONAI to report
        return
    if name in params:
        literal = isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool)
        if literal and _tensor_only(params[name].annotation):
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            channels = _config_at(config, "network_def#out_channels")
            if not isinstance(value, (list, tuple)) and isinstance(channels, int) and not isinstance(channels, bool):
                values = values * channels  # a loss's 0-d weight tensor stops torch's cross-entropy: one per channel
            # floats: torch's losses refuse an integer weight tensor
            tensor = "$torch.tensor([" + ",".join(str(float(v)) for v in values) + "])"
            cli = where.startswith("--")
            fix = f"pass {where} '{tensor}'" if cli else f"write {name}: \"{tensor}\" there"
            if path == "loss" and target.rpartition(".")[2] == "DiceCELoss" and target != "app.losses.DiceCELoss":
                fix += ", or use the bundle's own loss, app.losses.DiceCELoss, which takes a list or a number"
            raise ValueError(f"{where}{' ' if cli else ' = '}{value!r}: {target} (the {path!r} setting) takes {name} as "
                             f"a torch tensor only, so the run would stop when it builds it: {fix}.")
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"it takes {', '.join(accepted)}."
    raise ValueError(f"{where}: {target} (the {path!r} setting) takes no argument {name!r}: {hint} Fix the key, or make "
                     "a component of your own take it; the run would stop when it builds the component, after reading "
                     "the data.")

"""Command line ``python -m app infer``: segment one patient from any subset of FLAIR, T1, T1ce, T2.

Example::

    python -m app infer --bundle bundles/brats_gmd --ckpt model.pt \\
        --flair P/flair.nii.gz --t2 P/t2_dicom_folder/ --out P/seg.nii.gz --summary P/seg.json

Every bad input prints one line naming the file and the fix to stderr and exits with status 2,
leaving no output behind.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any, NoReturn, Sequence

__all__ = ["build_parser", "main", "parse_ints", "positive_int", "segmenter_from_args"]

_SEQ_FLAGS = ("flair", "t1", "t1ce", "t2")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (status 2) instead of usage + message; the parser of
    every inference command (``infer``, ``app.inference.export``, ``app.inference.batch``).

    Args:
        unrecognized_hint: said before ``run with --help for usage`` when an argument is not recognised.
        args, kwargs: ``argparse.ArgumentParser``'s.
    """

    def __init__(self, *args: Any, unrecognized_hint: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unrecognized_hint = unrecognized_hint

    def error(self, message: str) -> NoReturn:
        hint = "run with --help for usage"
        if self.unrecognized_hint and "unrecognized arguments" in message:
            hint = f"{self.unrecognized_hint}; {hint}"
        self.exit(2, f"error: {message}: {hint}.\n")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_ints(text: Sequence[str] | str, what: str) -> list[int]:
    """``["8", "16"]``, ``"8,16"`` or ``"[8, 16]"`` -> ``[8, 16]``; raises ``ValueError`` naming ``what``."""
    joined = " ".join([text] if isinstance(text, str) else text)
    tokens = [t for t in re.split(r"[\s,\[\]()]+", joined) if t]
    try:
        return [int(t) for t in tokens]
    except ValueError as err:
        raise ValueError(f"{what} takes integers, e.g. {what} 96 96 96; got {joined!r}.") from err


def build_parser() -> argparse.ArgumentParser:
    """The ``infer`` argument parser (no heavy imports, so ``--help`` is instant)."""
    p = _OneLineParser(
        prog="python -m app infer",
        description="Segment a brain tumour (WT/TC/ET) from any non-empty subset of FLAIR, T1, T1ce and T2. "
                    "Each sequence is a NIfTI file or a folder holding one DICOM series. The label map is "
                    "written on the exact grid of the input (same shape, affine and qform/sform codes).",
        epilog="Bad input exits with status 2 and one line on stderr naming the file and the fix.",
        unrecognized_hint="sequences are given with --flair, --t1, --t1ce, --t2 or --input NAME=FILE (NAME one of "
                          "flair, t1, t1ce, t2 or an alias such as t2f, t1n, t1c, t2w)",
    )
    seq = p.add_argument_group("input sequences (any non-empty subset)")
    for name in _SEQ_FLAGS:
        # append, so that a flag given twice is refused instead of the last file silently winning
        seq.add_argument(f"--{name}", metavar="FILE", action="append",
                         help=f"{name.upper()} NIfTI file or DICOM series folder")
    seq.add_argument("--input", metavar="NAME=FILE", action="append", default=[],
                     help="a sequence by name or alias (t2f, t1n, t1c, t1gd, t2w, ...); repeatable")
    seq.add_argument("--case-dir", metavar="DIR",
                     help="folder of one case in the BraTS 2018 (<case>_flair.nii.gz), BraTS 2023 (<case>-t2f.nii.gz) "
                          "or MSD/nnU-Net layout; its sequences are found by name")
    p.add_argument("--bundle", help="bundle folder whose configs/train.yaml gives the defaults "
                                   "(default: bundles/brats_gmd of the checkout the package runs from; a package "
                                   "installed without it has the shipped train.yaml's values built in)")
    p.add_argument("--ckpt", required=True, help="model.pt written by training, or a model.ts exported from it")
    p.add_argument("--out", required=True, metavar="OUT.nii.gz", help="label map to write")
    p.add_argument("--labels", default="auto", choices=("auto", "2018", "2021", "2023", "2024"),
                   help="label values: auto (default) = those of the --case-dir's dataset.json (MSD/nnU-Net), 1/2/3 "
                        "when every sequence file is named as BraTS 2023 names them (<case>-t2f.nii.gz), else "
                        "1/2/4; 2018 = 1/2/4 (BraTS 2018-2021); 2023 = 1/2/3 (also "
                        "2024; no resection cavity is predicted)")
    p.add_argument("--probabilities", metavar="PROB.nii.gz",
                   help="also write WT/TC/ET probabilities (4D float32, same grid)")
    p.add_argument("--summary", metavar="S.json",
                   help="also write a JSON summary (sequences, region volumes in mL, timing)")
    p.add_argument("--resample-to", metavar="SEQ",
                   help="resample the other sequences onto SEQ's grid when the grids differ (default: error)")
    p.add_argument("--spacing", nargs="+", metavar="MM", default=["auto"],
                   help="resample to this spacing (1 or 3 values, mm; 3 are along R, A and S, not the file's voxel "
                        "axes) for the network and back; native: never; "
                        "auto (default): to the model's training spacing when the scan's differs by more than 10%%")
    p.add_argument("--features", nargs="+", metavar="N",
                   help="network widths per level (default: read from the checkpoint)")
    p.add_argument("--patch-size", nargs="+", metavar="N",
                   help="sliding-window size, 3 multiples of the network divisor; 0 along an axis = the whole "
                        "foreground crop (default: the whole crop as one window up to 256^3 voxels, else windows "
                        "of the bundle's patch_size)")
    p.add_argument("--overlap", type=float,
                   help="sliding-window overlap when there are several windows (default: the bundle's sw_overlap)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call (default: the bundle's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA (bf16, or fp16 on GPUs without native bf16)")
    p.add_argument("--no-head-mask", action="store_true",
                   help="keep labels where every given sequence is 0 (default: background there, outside the "
                        "skull-stripped head)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def _sequence_paths(
    args: argparse.Namespace,
) -> tuple[dict[str, str], dict[str, int] | None, str | None, list[str], dict[str, list[int]] | None]:
    """``({sequence: path}, channels, case name, other inputs, label map)`` from the sequence flags or
    ``--case-dir``; the other inputs are the files besides the sequences that ``--case-dir`` reads (an MSD
    ``dataset.json``), whose label values are the label map (None for other layouts)."""
    from app.data.discovery import case_sources, discover_cases
    from app.inference.io import sequence_name

    paths: dict[str, str] = {}
    for name in _SEQ_FLAGS:
        given = getattr(args, name) or []
        if len(given) > 1:
            raise ValueError(f"Sequence {name!r} given twice ({given[0]} and {given[1]}): pass one file per "
                             "sequence.")
        if given:
            paths[name] = given[0]
    for item in args.input:
        if "=" not in item:
            raise ValueError(f"--input {item!r} must be NAME=FILE, e.g. --input t2w=scan_t2.nii.gz.")
        name, path = item.split("=", 1)
        seq = sequence_name(name)
        if seq in paths:
            raise ValueError(f"Sequence {seq!r} given twice ({paths[seq]} and {path}): pass one file per sequence.")
        paths[seq] = path
    if args.case_dir is None:
        return paths, None, None, [], None
    if paths:
        raise ValueError("--case-dir cannot be combined with --flair/--t1/--t1ce/--t2/--input: give either the case "
                         "folder or the files.")
    cases = discover_cases(args.case_dir)
    if len(cases) != 1:
        names = ", ".join(c["case"] for c in cases[:5])
        more = ", ..." if len(cases) > 5 else ""
        raise ValueError(f"--case-dir {args.case_dir} holds {len(cases)} cases ({names}{more}"
                         "): pass the folder of one case, or run the batch bundle (configs/inference.yaml) on it.")
    rec = cases[0]
    label_map = rec["label_map"] if rec["layout"] == "msd" else None
    if rec["image4d"]:
        return ({s: rec["image4d"] for s in rec["channels"]} | dict(rec["images"]), dict(rec["channels"]), rec["case"],
                case_sources(rec), label_map)
    return dict(rec["images"]), None, rec["case"], case_sources(rec), label_map



def segmenter_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~app.inference.pipeline.Segmenter` for the network flags shared by ``infer`` and batch mode."""
    from app.inference.pipeline import load_segmenter, parse_spacing

    return load_segmenter(
        args.ckpt,
        bundle=args.bundle,
        features=parse_ints(args.features, "--features") if args.features else None,
        patch_size=parse_ints(args.patch_size, "--patch-size") if args.patch_size else None,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        device=args.device,
        amp=not args.no_amp,
        spacing=parse_spacing(args.spacing, "--spacing"),
        head_mask=not args.no_head_mask,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``infer``; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, one line already printed)
        return int(exit_.code or 0)
    try:
        # heavy imports after parsing: --help and usage errors stay fast
        import torch

        from app.inference.pipeline import segment_case, summary_notes

        paths, channels, case, other_inputs, label_map = _sequence_paths(args)
        if not paths:
            raise ValueError("No input sequence given: pass at least one of --flair, --t1, --t1ce, --t2 "
                             "(or --input NAME=FILE, or --case-dir DIR).")
        if args.threads:
            torch.set_num_threads(int(args.threads))
        start = time.perf_counter()
        segmenter = segmenter_from_args(args)
        result = segment_case(
            segmenter, paths, args.out, labels=args.labels, probabilities=args.probabilities, summary=args.summary,
            resample_to=args.resample_to, channels=channels, case=case, other_inputs=other_inputs,
            label_map=label_map,
        )
    except (ValueError, FileNotFoundError, OSError) as err:  # CaseError is a ValueError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not args.quiet:
        vols = result["volumes_ml"]
        notes = "".join(f"; {n}" for n in summary_notes(result))
        print(f"Wrote {result['output']} from {'+'.join(result['sequences_used'])}: WT {vols['WT']:.1f} mL, "
              f"TC {vols['TC']:.1f} mL, ET {vols['ET']:.1f} mL in {time.perf_counter() - start:.1f} s "
              f"({segmenter.device}{notes}).")
    return 0


if __name__ == "__main__":
    from app.atomic import exit_with, run_interruptible

    exit_with(run_interruptible(main))

"""Export a trained DS U-Net checkpoint to TorchScript for deployment.

Command line::

    python -m app.inference.export --ckpt O/models/model.pt --out model.ts [--bundle bundles/brats_gmd]

The model is *scripted*, not traced: which encoders run depends on the modality mask, so it is an
input of the exported model (``model(image [B, 4, D, H, W], modality_mask [B, 4] bool)``) and every
sequence subset works. Spatial sizes must be multiples of ``2 ** (len(features) - 1)``; ``infer``
takes care of that. The export is written to a temporary file next to ``--out`` and checked against
the eager model on a small random input for several masks; only a model that passes replaces
``--out``, so a deployed model is never lost to a failed export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from app.inference.cli import _OneLineParser

if TYPE_CHECKING:  # torch is imported after argument parsing, so that --help stays instant
    import torch

__all__ = ["build_parser", "main", "verify_export"]


def verify_export(eager: torch.nn.Module, scripted: torch.nn.Module, divisor: int, atol: float = 1e-4) -> float:
    """Largest absolute logit difference between the two models over a few masks; raises if above ``atol``.

    Raises:
        ValueError: the largest difference exceeds ``atol``.
    """
    import torch

    from app.subsets import subset_masks

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 4, divisor * 2, divisor * 2, divisor * 2, generator=generator)
    worst = 0.0
    with torch.inference_mode():
        for mask in subset_masks(4)[[0, 5, 14]]:  # one, two and all four sequences
            diff = (eager(image, mask[None]) - scripted(image, mask[None])).abs().max().item()
            worst = max(worst, diff)
    if worst > atol:
        raise ValueError(f"The exported model differs from the checkpoint by {worst:.3g} (> {atol}): do not deploy it; "
                         "report the torch version.")
    return worst


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m app.inference.export``; a usage error is one line."""
    p = _OneLineParser(prog="python -m app.inference.export",
                       description="Script a DS U-Net checkpoint (model.pt) into a TorchScript model (model.ts) that "
                                   "takes (image, modality_mask) and serves every sequence subset.")
    p.add_argument("--ckpt", required=True, help="model.pt written by training")
    p.add_argument("--out", required=True, help="TorchScript file to write, ending in .ts (e.g. model.ts)")
    p.add_argument("--bundle", help="bundle folder for default features (default: this repository's)")
    p.add_argument("--features", nargs="+", metavar="N", help="network widths (default: read from the checkpoint)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Export; returns 0, or 2 with one line on stderr for a bad checkpoint or path."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, one line already printed)
        return int(exit_.code or 0)
    try:
        import torch

        from app.inference.cli import parse_ints
        from app.inference.model import (TORCHSCRIPT_SUFFIX, export_torchscript, is_torchscript, is_weights_file,
                                         network_from_checkpoint)
        from app.inference.pipeline import check_output_path
        from app.networks.weights import checkpoint_missing

        # the option of this command, not the bundle's --ckpt_path that the loader names
        if not args.ckpt.strip():
            raise ValueError("--ckpt is empty (an unset variable?): pass the model.pt written by training "
                             "(<output_dir>/models/model.pt).")
        if not Path(args.ckpt).is_file():
            raise checkpoint_missing(args.ckpt, "pass --ckpt the model.pt written by training "
                                     "(<output_dir>/models/model.pt).")
        # before any work: a bad name, a folder, an unwritable place, or the checkpoint itself (whose
        # weights would be lost to the export)
        # .ts only: inference runs a TorchScript model (a program) only from a file named so
        out = check_output_path(args.out, "--out", (TORCHSCRIPT_SUFFIX,), [args.ckpt])
        if is_weights_file(out):  # a model.pt of training: its weights would be lost; an earlier export may go
            raise ValueError(f"--out {args.out} is a checkpoint written by training, not an exported model: its "
                             "weights would be lost. Choose another name, e.g. model.ts.")
        if is_torchscript(args.ckpt):
            raise ValueError(f"{args.ckpt} is already a TorchScript model: pass the model.pt written by training.")
        features = parse_ints(args.features, "--features") if args.features else None
        network = network_from_checkpoint(args.ckpt, features, args.bundle)
        differences: list[float] = []

        def verify(tmp: Path) -> None:  # on the temporary file: a model that fails never replaces --out
            differences.append(verify_export(network, torch.jit.load(str(tmp)), network.divisor))

        path = export_torchscript(network, out, check=verify)
        worst = differences[0]
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"Exported {args.ckpt} (features {network.features}) to {path}; max logit difference {worst:.2g}.")
    return 0


if __name__ == "__main__":
    from app.atomic import exit_with, run_interruptible

    exit_with(run_interruptible(main))

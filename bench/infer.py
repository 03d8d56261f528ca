"""Benchmark clinical inference on one full-size case with 4, 3, 2 and 1 sequences.

Runs :func:`app.inference.pipeline.Segmenter.predict` (preprocessing, sliding-window network and
postprocessing back onto the input grid) on a 240x240x155 case and prints one JSON line per
(device, sequence subset), plus the file reading and writing time measured separately. The case is
the first real BraTS 2018 case in ``../shared/data/brats18_dev`` (or ``BRATS_DEV_DIR``) when
present, otherwise a phantom of that size. Without ``--ckpt`` an untrained network with the given
``--features`` (default 16 32 64 128 256) is used: the timing does not depend on the weights. With
``--ckpt``, the widths come from the checkpoint, and ``--features`` must match them.

Besides wall-clock times, each line reports the process CPU time of the inference (``cpu_s``)
and ``cpu_s / threads``: on a shared machine the wall time includes waiting for cores that
other processes hold, and ``load_average`` says how busy the machine was.

Usage (from the repository root)::

    python bench/infer.py --threads 2                      # CPU, plus CUDA when available
    python bench/infer.py --devices cuda --repeats 5       # GPU only
    python bench/infer.py --patch-size 96 96 96 --overlap 0.5   # train.yaml's validation windowing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from app.data.discovery import discover_cases  # noqa: E402
from app.data.phantoms import make_phantom  # noqa: E402
from app.inference.io import read_case  # noqa: E402
from app.inference.pipeline import _output_image, load_segmenter  # noqa: E402
from app.networks import DSUNet  # noqa: E402
from app.subsets import BRATS_MODALITIES  # noqa: E402

#: Sequence subsets timed by default: all four, then dropping T1, T1ce, FLAIR in turn.
SUBSETS = ("flair+t1+t1ce+t2", "flair+t1ce+t2", "flair+t2", "flair")


def _case(args: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, str]]:
    dev = Path(os.environ.get("BRATS_DEV_DIR") or REPO.parent / "shared" / "data" / "brats18_dev")
    if args.case:
        rec = discover_cases(args.case)[0]
        return rec["case"], dict(rec["images"])
    if dev.is_dir():
        rec = discover_cases(dev)[0]
        return rec["case"], dict(rec["images"])
    volumes = make_phantom((240, 240, 155), np.random.default_rng(0))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = 239
    paths = {}
    for seq in BRATS_MODALITIES:
        paths[seq] = str(tmp / f"phantom_{seq}.nii.gz")
        nib.save(nib.Nifti1Image(volumes[seq], affine), paths[seq])
    return "phantom_240x240x155", paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help="case folder (default: first brats18_dev case, else a phantom)")
    p.add_argument("--ckpt", help="checkpoint (default: untrained network with --features)")
    p.add_argument("--features", type=int, nargs="+",
                   help="network widths (default without --ckpt: 16 32 64 128 256; with it: the checkpoint's)")
    p.add_argument("--bundle", default=str(REPO / "bundles" / "brats_gmd"))
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when unavailable")
    p.add_argument("--subsets", default=",".join(SUBSETS))
    p.add_argument("--patch-size", type=int, nargs=3,
                   help="window size; 0 0 0 = whole crop (default: as infer, the whole crop as one window)")
    p.add_argument("--overlap", type=float, help="window overlap (default: the bundle's)")
    p.add_argument("--sw-batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per subset (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        case, paths = _case(args, tmp)
        ckpt = args.ckpt
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = str(tmp / "untrained.pt")
            torch.save(DSUNet(features=args.features or [16, 32, 64, 128, 256]).state_dict(), ckpt)
        for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(json.dumps({"device": device, "skipped": "CUDA not available"}), flush=True)
                continue
            seg = load_segmenter(ckpt, bundle=args.bundle, features=args.features, patch_size=args.patch_size,
                                 overlap=args.overlap,
                                 sw_batch_size=args.sw_batch_size, device=device)
            warmup = args.warmup if args.warmup is not None else (1 if device.startswith("cuda") else 0)
            for subset in args.subsets.split(","):
                seqs = subset.split("+")
                start = time.perf_counter()
                inputs = read_case({s: paths[s] for s in seqs})
                read_s = time.perf_counter() - start
                for _ in range(warmup):
                    seg.predict(inputs)
                runs = []
                for _ in range(max(1, args.repeats)):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    pred = seg.predict(inputs)
                    runs.append((time.perf_counter() - start, pred, time.process_time() - cpu_start))
                infer_s = statistics.median(r[0] for r in runs)
                cpu_s = statistics.median(r[2] for r in runs)
                pred = runs[0][1]
                start = time.perf_counter()
                nib.save(_output_image(pred.labels, inputs.ref, "bench"), str(tmp / "labels.nii.gz"))
                write_s = time.perf_counter() - start
                print(json.dumps({
                    "case": case, "shape": list(inputs.ref.shape), "device": str(seg.device),
                    "device_name": torch.cuda.get_device_name(seg.device) if seg.device.type == "cuda" else
                    platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "sequences": seqs, "n_sequences": len(seqs),
                    "features": seg.settings["features"], "roi_size": pred.details["roi_size"],
                    "single_window": pred.details["single_window"], "overlap": seg.overlap, "crop_box": pred.details["crop_box"], "amp_bf16": seg.amp,
                    "infer_s": round(infer_s, 3), "runs_s": [round(r[0], 3) for r in runs],
                    # process CPU time / threads: the wall time this run would take on idle cores
                    "cpu_s": round(cpu_s, 3), "cpu_s_per_thread": round(cpu_s / torch.get_num_threads(), 3),
                    **{k: round(v, 3) for k, v in pred.timing.items()},
                    "read_s": round(read_s, 3), "write_s": round(write_s, 3),
                    "end_to_end_s": round(read_s + infer_s + write_s, 3),
                    "load_average": os.getloadavg()[0], "torch": torch.__version__,
                }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

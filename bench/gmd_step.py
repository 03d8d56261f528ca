"""Time one training step of each gradient strategy on the DS U-Net.

Prints one JSON line per strategy: ``strategy``, ``step_s`` (median), ``ratio_to_plain``,
``peak_mem_gib`` (CUDA only, else null) and, for ``gmd_approx``, ``fidelity``: the cosine between
its merged gradient and the exact GMD gradient on the same batch.

    python bench/gmd_step.py --device cpu|cuda --patch D H W --batch B --features F1 F2 ... --steps N [--amp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engines.trainer import autocast_context  # noqa: E402
from app.engines.utils import amp_dtype  # noqa: E402
from app.networks import DSUNet  # noqa: E402
from app.strategies import build_strategy  # noqa: E402

CASES = [("plain", "plain", {}), ("dropout", "dropout", {}), ("gmd", "gmd", {"subsets": "all"}),
         ("gmd_k5", "gmd", {"subsets": 5}), ("gmd_approx", "gmd_approx", {"subsets": "all"}),
         ("cggm", "cggm", {})]


def _loss():
    """The segmentation bundle's own loss, as ``train.yaml`` builds it (a change there is timed here too)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "brats_gmd" / "configs" / "train.yaml"))
    return parser.get_parsed_content("loss")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grad_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in model.parameters()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="CUDA: keep cuDNN's default kernels instead of autotuning them for the patch")
    parser.add_argument("--vjp-chunk", type=int, default=1, help="per-subset VJPs batched together by exact GMD")
    parser.add_argument("--only", nargs="*", default=None, help="subset of: plain dropout gmd gmd_k5 gmd_approx cggm")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available: use --device cpu.")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not args.no_cudnn_benchmark
    torch.manual_seed(0)
    model = DSUNet(features=args.features).to(device)
    if any(s % model.divisor for s in args.patch):
        parser.error(f"--patch sizes must be multiples of {model.divisor} for {len(args.features)} levels.")
    x = torch.randn(args.batch, 4, *args.patch, device=device)
    y = (torch.rand(args.batch, 3, *args.patch, device=device) > 0.8).float()
    mask = torch.ones(args.batch, 4, dtype=torch.bool, device=device)
    loss_fn = _loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a real optimizer step, weights unchanged

    results, exact_grad = {}, None
    for label, name, kwargs in CASES:
        if args.only and label not in args.only:
            continue
        strategy = build_strategy(name, seed=0, vjp_chunk=args.vjp_chunk, **kwargs)
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup + args.steps):
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, args.amp, training=True):
                strategy.step(model, x, mask, y, loss_fn, iteration=i + 1)
            optimizer.step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        record = {
            "strategy": label, "device": str(device), "patch": args.patch, "batch": args.batch,
            "features": args.features, "amp": amp_dtype(device, args.amp, training=True) is not None, "step_s": round(statistics.median(times), 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        }
        if label == "gmd":
            exact_grad = _grad_vector(model)
        if label == "gmd_approx":
            if exact_grad is None:  # fidelity needs the exact gradient of the same batch
                optimizer.zero_grad(set_to_none=True)
                with autocast_context(device, args.amp, training=True):
                    build_strategy("gmd", seed=0, vjp_chunk=args.vjp_chunk).step(model, x, mask, y, loss_fn)
                exact_grad = _grad_vector(model)
                optimizer.zero_grad(set_to_none=True)
                with autocast_context(device, args.amp, training=True):
                    build_strategy("gmd_approx", seed=0).step(model, x, mask, y, loss_fn)
            approx = _grad_vector(model)
            record["fidelity"] = round(float(approx @ exact_grad / (approx.norm() * exact_grad.norm() + 1e-30)), 4)
        results[label] = record
    plain = results.get("plain", {}).get("step_s")
    for record in results.values():
        record["ratio_to_plain"] = round(record["step_s"] / plain, 3) if plain else None
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

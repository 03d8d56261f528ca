"""Synthetic BraTS-like cases with MRI-like contrasts, for tests and quick runs without real data.

Each phantom is a head (dim skull rim, grey and white matter, CSF rim and ventricles) holding one
irregular tumour: oedema around a core of enhancing rim and necrotic centre. Contrasts follow real
MRI so that modality dominance resembles BraTS: FLAIR and T2 show the whole tumour, only T1ce
separates enhancing tumour from necrosis, and T1 alone barely shows the tumour. A smooth
multiplicative bias field and Rician noise are added per sequence; the background is zero like the
skull-stripped BraTS images.

Command line (dispatched by ``python -m app phantoms``)::

    python -m app.data.phantoms --out DIR --cases 16 --size 48 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from app.subsets import BRATS_MODALITIES

__all__ = ["PHANTOM_LABELS", "TISSUE_INTENSITIES", "main", "make_phantom", "write_phantoms"]

#: Label values written in the phantom segmentations (BraTS 2018 convention).
PHANTOM_LABELS = {"ncr": 1, "ed": 2, "et": 4}

#: Mean intensity of each tissue per sequence, in BRATS_MODALITIES order (flair, t1, t1ce, t2).
#: Loosely modelled on BraTS value ranges; only the ratios matter.
TISSUE_INTENSITIES: dict[str, tuple[float, float, float, float]] = {
    "rim": (180.0, 420.0, 430.0, 260.0),
    "csf": (90.0, 160.0, 170.0, 950.0),  # dark on FLAIR (suppressed fluid), bright on T2
    "gm": (430.0, 360.0, 370.0, 520.0),
    "wm": (350.0, 470.0, 480.0, 380.0),
    "edema": (760.0, 370.0, 420.0, 820.0),  # FLAIR/T2 bright, T1ce ~ brain, T1 slightly dark
    "et": (600.0, 385.0, 980.0, 680.0),  # enhancing rim: bright on T1ce only
    "ncr": (520.0, 300.0, 190.0, 880.0),  # necrosis: dark on T1ce, bright on T2
}
_MIN_SIZE = 16
_MAX_TRIES = 20


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Open grid of normalised coordinates in [-1, 1] per axis."""
    return list(np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)])


def _smooth_field(grid: list[np.ndarray], rng: np.random.Generator, n_modes: int, max_freq: float) -> np.ndarray:
    """Random smooth field of roughly unit variance: a sum of low-frequency plane waves.

    ``cos(k.x + phase)`` is the real part of a product of per-axis complex exponentials, so all modes
    reduce to one matrix product instead of ``n_modes`` full-volume cosines.
    """
    axes = [g.ravel() for g in grid]
    k = rng.normal(size=(n_modes, 3))
    k *= (rng.uniform(0.5, max_freq, n_modes) * np.pi / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0.0, 2.0 * np.pi, n_modes)
    ex = np.exp(1j * (k[:, 0, None] * axes[0][None] + phase[:, None]))
    ey = np.exp(1j * k[:, 1, None] * axes[1][None])
    ez = np.exp(1j * k[:, 2, None] * axes[2][None])
    exy = (ex[:, :, None] * ey[:, None, :]).reshape(n_modes, -1)
    field = (exy.T @ ez).real.reshape(len(axes[0]), len(axes[1]), len(axes[2]))
    return np.clip(field / np.sqrt(n_modes / 2.0), -2.5, 2.5).astype(np.float32)


def _level(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray, wobble: np.ndarray | float) -> np.ndarray:
    """Perturbed-ellipsoid level set: < 1 inside; ``wobble`` makes the surface irregular."""
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))
    return (dist * (1.0 + wobble)).astype(np.float32)


def _soft(level: np.ndarray, threshold: float, radius: float, voxel: float) -> np.ndarray:
    """Partial-volume membership: 0.5 on the surface ``level == threshold``, about one voxel wide."""
    return (1.0 / (1.0 + np.exp(-np.clip((threshold - level) * radius / (0.25 * voxel), -30, 30)))).astype(np.float32)


def make_phantom(size: int | Sequence[int], rng: np.random.Generator | int | None = None) -> dict[str, np.ndarray]:
    """Generate one synthetic case.

    Args:
        size: grid size, an int for a cube or three ints; each at least 16.
        rng: numpy Generator or seed.

    Returns:
        ``{"flair", "t1", "t1ce", "t2"}``: int16 images; ``"seg"``: uint8 labels 0/1/2/4 (BraTS 2018);
        ``"brain"``: bool mask of normal brain parenchyma (grey/white matter outside the tumour, for
        contrast checks; not written to disk). All of shape ``size``; every phantom contains all
        three tumour labels.

    Raises:
        ValueError: ``size`` is not an int or three ints, each at least 16.
        RuntimeError: no tumour with all three labels fits the grid.
    """
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)  # type: ignore[arg-type]
    if len(shape) != 3 or min(shape) < _MIN_SIZE:
        raise ValueError(f"Phantom size must be an int or three ints, each >= {_MIN_SIZE}; got {size!r}.")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    grid = _grid(shape)
    voxel = 2.0 / min(shape)  # one voxel in normalised units (smallest axis: conservative)

    # anatomy
    head_c = rng.uniform(-0.03, 0.03, 3)
    head_r = np.array([0.88, 0.92, 0.85]) * rng.uniform(0.94, 1.0, 3)
    head_l = _level(grid, head_c, head_r, 0.03 * _smooth_field(grid, rng, 4, 1.5))
    gyri_l = head_l * (1.0 + 0.03 * _smooth_field(grid, rng, 8, 5.0))
    wm_l = head_l * (1.0 + 0.08 * _smooth_field(grid, rng, 6, 3.0))
    r_head = float(head_r.mean())
    head = _soft(head_l, 1.0, r_head, voxel)
    intracranial = _soft(head_l, 0.9, r_head, voxel)
    brain = _soft(gyri_l, 0.84, r_head, voxel)
    wm = _soft(wm_l, 0.6, r_head, voxel)
    vent_r = np.array([0.07, 0.22, 0.11]) * rng.uniform(0.8, 1.2)
    ventricles = np.maximum(
        *(_soft(_level(grid, head_c + np.array([dx, 0.05, 0.1]), vent_r, 0.0), 1.0, float(vent_r.mean()), voxel)
          for dx in (-0.1, 0.1))
    )

    for _ in range(_MAX_TRIES):
        # tumour: oedema around a core; the core is an enhancing rim around a necrotic centre
        direction = rng.normal(size=3)
        centre = head_c + direction / np.linalg.norm(direction) * rng.uniform(0.0, 0.42) * head_r
        core_r = rng.uniform(0.15, 0.3) * rng.uniform(0.8, 1.25, 3)
        core_r = np.maximum(core_r, 2.5 * voxel)  # keep necrosis and rim resolvable on small grids
        ed_r = np.maximum(core_r * rng.uniform(1.3, 2.0), core_r + 2 * voxel)
        core_l = _level(grid, centre, core_r, 0.25 * _smooth_field(grid, rng, 6, 3.0))
        nec_f = rng.uniform(0.5, 0.72)
        nec_l = core_l * (1.0 + 0.08 * _smooth_field(grid, rng, 6, 3.0))
        ed_l = _level(grid, centre, ed_r, 0.2 * _smooth_field(grid, rng, 8, 3.5))
        # oedema always surrounds the core by a margin, and the tumour stays inside the brain
        ed_l = np.minimum(ed_l, core_l / 1.35)
        in_brain = gyri_l < 0.84
        core_hard = (core_l < 1.0) & in_brain
        nec_hard = (nec_l < nec_f) & (core_l < 0.85) & in_brain
        ed_hard = (ed_l < 1.0) & in_brain
        seg = np.zeros(shape, dtype=np.uint8)
        seg[ed_hard] = PHANTOM_LABELS["ed"]
        seg[core_hard] = PHANTOM_LABELS["et"]
        seg[nec_hard] = PHANTOM_LABELS["ncr"]
        if all(np.count_nonzero(seg == v) >= 4 for v in PHANTOM_LABELS.values()):
            break
    else:  # pragma: no cover - only reachable for pathological sizes
        raise RuntimeError(f"Could not place a tumour with all labels in a {shape} phantom; use a larger size.")

    r_core = float(core_r.mean())
    ed_s = _soft(ed_l, 1.0, float(ed_r.mean()), voxel) * brain
    core_s = _soft(core_l, 1.0, r_core, voxel) * brain
    nec_s = _soft(nec_l, nec_f, r_core, voxel) * _soft(core_l, 0.85, r_core, voxel) * brain
    tumour_texture = 1.0 + 0.08 * _smooth_field(grid, rng, 10, 8.0)
    tissue_texture = 1.0 + 0.03 * _smooth_field(grid, rng, 10, 8.0)

    out: dict[str, np.ndarray] = {}
    head_mask = head > 0.5
    for c, seq in enumerate(BRATS_MODALITIES):
        mean = {t: v[c] * rng.uniform(0.95, 1.05) for t, v in TISSUE_INTENSITIES.items()}
        img = np.zeros(shape, dtype=np.float32)
        # painter's algorithm: each layer blends over the previous one by its partial-volume membership
        for layer, value in (
            (head, mean["rim"]),
            (intracranial, mean["csf"]),
            (brain, mean["gm"] * tissue_texture),
            (wm * brain, mean["wm"] * tissue_texture),
            (ventricles * brain, mean["csf"]),
            (ed_s, mean["edema"] * tumour_texture),
            (core_s, mean["et"] * tumour_texture),
            (nec_s, mean["ncr"] * tumour_texture),
        ):
            img = img * (1.0 - layer) + layer * value
        img *= np.exp(0.1 * _smooth_field(grid, rng, 3, 0.8))  # coil bias field: smooth, about +-10%
        img *= rng.uniform(0.8, 1.25)  # scanner gain: intensities are not calibrated across cases
        sigma = 0.035 * float(np.mean(img[brain > 0.5]))
        img = np.sqrt((img + rng.normal(0.0, sigma, shape)) ** 2 + rng.normal(0.0, sigma, shape) ** 2)  # Rician
        img[~head_mask] = 0.0  # skull-stripped-style zero background
        out[seq] = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    out["seg"] = seg
    out["brain"] = (brain > 0.95) & (ventricles < 0.05) & (ed_s < 0.05) & (seg == 0)
    return out


def _affine(shape: tuple[int, ...]) -> np.ndarray:
    # 1 mm voxels oriented like the BraTS releases (LPS storage order, RAS world), so phantoms exercise
    # the same reorientation path as real data
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def write_phantoms(out_dir: str | os.PathLike, cases: int, size: int | Sequence[int] = 48, seed: int = 0) -> list[str]:
    """Write ``cases`` phantoms as BraTS 2018-named NIfTI cases.

    Files are ``<out_dir>/Phantom_XXX/Phantom_XXX_{flair,t1,t1ce,t2,seg}.nii.gz``. Case ``i`` depends
    only on ``(seed, i, size)``, so asking for more cases keeps the existing ones identical. A case's files
    are written together (:func:`app.atomic.replace_file_set`, the label last): a full disk leaves the cases
    finished before it and no truncated file, nor a case with some of its files.

    Returns:
        The case folders written, in order.

    Raises:
        ValueError: ``cases`` < 1, a bad ``size``, or an ``out_dir`` that is a file or cannot be
            written (checked before any case is made).
        app.atomic.WriteError: a case could not be written (a full disk); the message names the file and the fix.
    """
    from app.atomic import check_writable_folder, replace_file_set

    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}.")
    root = Path(out_dir)
    check_writable_folder(root, f"phantom folder {out_dir}",
                          file_fix="pass a folder for the cases (created if missing)")
    folders = []
    for i in range(cases):
        case = f"Phantom_{i:03d}"
        folder = root / case
        volumes = make_phantom(size, np.random.default_rng([seed, i]))  # a bad size fails before any folder
        affine = _affine(volumes["seg"].shape)
        files = {}
        for name in (*BRATS_MODALITIES, "seg"):
            img = nib.Nifti1Image(volumes[name], affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            # nib.save wrote in place: a full disk left a truncated scan, which training then refused as damaged
            files[folder / f"{case}_{name}.nii.gz"] = gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
        replace_file_set(files, last=folder / f"{case}_seg.nii.gz")
        folders.append(str(folder))
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--out DIR --cases N --size S --seed K``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m app phantoms",
        description="Write synthetic BraTS-2018-named cases (<out>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz).",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--cases", type=int, default=16, help="number of cases (default 16)")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[48], help="grid size: S or X Y Z, each >= 16 (default 48)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed, a whole number >= 0 (default 0)")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 3):
        parser.error("--size takes one value (cube) or three values (X Y Z).")
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    if args.cases < 1:  # each bad option named with its own value and fix
        parser.error(f"--cases {args.cases} must be a whole number >= 1, e.g. --cases 16.")
    if min(args.size) < _MIN_SIZE:
        parser.error(f"--size {' '.join(map(str, args.size))}: every size must be >= {_MIN_SIZE} voxels, "
                     f"e.g. --size 48.")
    if args.seed < 0:  # numpy's own refusal named no flag: "error: expected non-negative integer"
        parser.error(f"--seed must be a whole number >= 0, got {args.seed}: e.g. --seed 0.")
    start = time.perf_counter()
    folders = write_phantoms(args.out, args.cases, size, args.seed)
    print(f"Wrote {len(folders)} phantom case(s) of size {size} to {args.out} in {time.perf_counter() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Segment one case with any subset of sequences and write the result on the patient's own grid.

The steps mirror the training preprocessing of ``bundles/brats_gmd/configs/train.yaml`` and undo
every geometric step afterwards, so the label map overlays the input exactly:

1. reorient to RAS by axis permutation/flips only (exact and invertible, also for oblique scans);
2. resample to the model's training spacing when the scan's differs by more than 10% (``--spacing
   auto``, the default), or to a given spacing, with trilinear interpolation;
3. crop to the foreground (voxels > 0 in any given sequence), as ``CropForegroundd`` did;
4. normalise each given sequence on its non-zero voxels (``NormalizeIntensityd(nonzero, channel_wise)``);
5. Gaussian-blended sliding-window inference over the crop, padded to the network divisor;
6. sigmoid, un-crop, resample back, threshold at 0.5 (WT/TC/ET), convert to labels, reorient back;
7. labels and probabilities are 0 outside the head (where every given sequence is 0): the scans are
   skull-stripped, so tumour cannot lie there (``head_mask``; training and evaluation score the raw
   network output).

:func:`segment_case` adds reading, checking and atomic writing; the command line
(:mod:`app.inference.cli`), the batch bundle and the Docker entrypoint all call it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import monai
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.transforms import NormalizeIntensity
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from app import __version__
from app.atomic import WriteError, check_path_text, check_writable_folder, write_error
from app.data.cache import available_memory
from app.data.datalist import ras_spacing, spacing_differs
from app.data.discovery import OUTPUT_DESCRIPTION_PREFIX, load_nifti, recorded_crc_matches, voxel_crc
from app.data.errors import CaseError, check_readable
from app.data.labels import LABEL_CONVENTIONS, LABEL_PARTS, regions_to_labels
from app.engines.utils import allocation_failure as _allocation_failure
from app.engines.utils import amp_dtype, check_patch_size, resolve_device
from app.engines.utils import is_out_of_memory as _out_of_memory
from app.flags import check_counts, check_share, parse_bool
from app.inference.io import AtomicOutputs, CaseInputs, Volume, option, read_case, voxel_volume_ml
from app.inference.model import bundle_defaults, bundle_version, load_network
from app.networks.weights import checkpoint_sha256
from app.subsets import BRATS_MODALITIES

__all__ = [
    "LABEL_CHOICES",
    "OutputWriteError",
    "Prediction",
    "Segmenter",
    "border_nonzero_fraction",
    "check_output_path",
    "check_writable_folder",
    "label_convention",
    "load_segmenter",
    "parse_spacing",
    "reorient",
    "segment_case",
    "summary_notes",
    "upload",
    "work_size",
    "written_by_product",
]

#: ``--labels`` values and the label convention each selects.
LABEL_CHOICES: dict[str, str] = {"2018": "brats2018", "2021": "brats2018", "2023": "brats2023", "2024": "brats2024"}

_RAS = axcodes2ornt("RAS")


class OutputWriteError(WriteError):
    """The outputs of a case could not be written (a full disk, a quota, a folder made read-only).

    The case's input is fine and nothing was written for it; batch mode keeps what an earlier run
    wrote for the case instead of removing it as the result of a case that now fails.
    """


def _write_error(err: OSError, path: str) -> OutputWriteError:
    """An :class:`OutputWriteError` naming ``path`` and the fix: ``nib.save`` and ``json.dump`` raise
    ``[Errno 28] No space left on device`` without the file or what to do about it."""
    error = write_error(err, path, OutputWriteError)
    error.args = (f"{error} Nothing was written for this case.",)
    return error


def parse_spacing(spacing: Sequence[float | str] | float | str | None, what: str = "spacing") -> list[float] | str:
    """A working-spacing setting as ``"auto"``, ``"native"`` or 3 positive numbers (mm).

    Accepts what the command line and bundle overrides pass: None (``"native"``), a mode name, one
    number, a string of 1 or 3 numbers (``"1 1 3"``, ``"1,1,3"``) or a sequence of them.

    Raises:
        ValueError: naming ``what`` (``--spacing`` on the command line) and the accepted values.
    """
    if spacing is None:
        return "native"
    if hasattr(spacing, "tolist"):  # numpy arrays and scalars, torch tensors
        spacing = spacing.tolist()
    if isinstance(spacing, str):
        if spacing.strip().lower() in ("auto", "native"):
            return spacing.strip().lower()
        spacing = [spacing]
    elif isinstance(spacing, (int, float)):
        spacing = [spacing]
    try:
        items = [s.tolist() if hasattr(s, "tolist") else s for s in spacing]
    except TypeError:  # not a sequence
        items = [spacing]
    tokens = [t for s in items for t in re.split(r"[\s,\[\]()]+", str(s)) if t]
    if len(tokens) == 1 and tokens[0].lower() in ("auto", "native"):
        return tokens[0].lower()
    try:
        return _checked_spacing(tokens, what)
    except ValueError:
        example = f"{what} 1 1 1" if what.startswith("-") else f'--{what} "[1, 1, 1]" on the bundle command line'
        raise ValueError(f"{what} takes auto, native, or 1 or 3 positive numbers in mm (e.g. {example}); "
                         f"got {' '.join(tokens)!r}.") from None


def _checked_spacing(spacing: Sequence[float | str], what: str) -> list[float]:
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what} takes 1 or 3 positive numbers (mm), got {spacing!r}.")
    return values


def work_size(size: int, spacing: float, work_spacing: float) -> int:
    """Voxels along one axis of ``size`` voxels of ``spacing`` mm once resampled to ``work_spacing`` mm.

    The extent is rounded half up after snapping to 1e-4 voxel. Plain ``round`` broke a tie such as a
    155-slice 1 mm scan at 2 mm (77.5) by the header's float noise: a spacing stored as 0.99999994 (a
    qform's float32 quaternion, an oblique affine) gave 77 slices and an exact 1.0 gave 78, so one scan
    exported by two converters was segmented on two grids, with different labels and volumes.
    """
    return max(1, math.floor(round(int(size) * float(spacing) / float(work_spacing), 4) + 0.5))


def upload(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` as a float32 tensor on ``device``, copied in its storage order.

    NIfTI voxels come in Fortran order. Making them C-contiguous on the host is a cache-unfriendly
    transpose that took longer than the network on a GPU; uploading the memory as it lies and
    permuting on the device is a plain copy. The result is a (possibly non-contiguous) view with
    the axes of ``array``.
    """
    arr = np.asarray(array, dtype=np.float32)
    order = sorted(range(arr.ndim), key=lambda a: (-abs(arr.strides[a]), a))  # outermost axis first
    stored = arr.transpose(order)
    if not stored.flags.c_contiguous or min(stored.strides, default=0) < 0:  # numpy ignores size-1 axes' strides
        stored = stored.copy(order="C")
    return torch.from_numpy(stored).to(device).permute(*np.argsort(order).tolist())


def reorient(tensor: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """nibabel's ``apply_orientation`` on the last three dimensions of a tensor: flips (a copy on the
    tensor's device, as torch has no negative strides), then a permutation (a view)."""
    lead = tensor.ndim - 3
    flips = [lead + axis for axis in range(3) if ornt[axis, 1] == -1]
    if flips:
        tensor = tensor.flip(flips)
    return tensor.permute(*range(lead), *(lead + int(a) for a in np.argsort(ornt[:, 0])))


def label_convention(labels: str | int, option: str = "--labels",
                     sources: Sequence[str | os.PathLike] | None = None) -> str:
    """Map ``--labels`` (``auto``, ``2018``, ``2023`` or a convention name) to a :data:`LABEL_CONVENTIONS` key.

    Args:
        labels: the setting's value.
        option: where the value came from (``--labels``, ``BRATS_LABELS``), named in the error.
        sources: the case's sequence files, which ``auto`` reads: ``brats2023`` (1/2/3) when every
            one is named as BraTS 2023+ names them (``<case>-t2f.nii.gz``), as training reads such
            cases, else ``brats2018`` (1/2/4). Without them ``auto`` stays ``"auto"``, to be
            resolved per case.

    Raises:
        ValueError: not a label convention.
    """
    key = str(labels).strip().lower()
    if key == "auto":
        if sources is None:
            return "auto"
        from app.data.discovery import brats2023_named

        names = [os.fspath(s) for s in sources]
        return "brats2023" if names and all(brats2023_named(n) for n in names) else "brats2018"
    if key in LABEL_CONVENTIONS:
        return key
    if key not in LABEL_CHOICES:
        raise ValueError(f"{option} {str(labels)!r} is not a label convention: use auto (1/2/3 for BraTS 2023-named "
                         "files, else 1/2/4), 2018 (labels 1/2/4, BraTS 2018-2021) or 2023 (1/2/3; 2024 writes the "
                         "same values).")
    return LABEL_CHOICES[key]


@dataclass
class Prediction:
    """The result of :meth:`Segmenter.predict`, on the grid of the case's reference sequence.

    Attributes:
        labels: uint8 label map ``[X, Y, Z]``.
        probabilities: float32 ``[X, Y, Z, 3]`` WT/TC/ET probabilities, or None when not asked for.
        timing: seconds spent per step.
        details: crop box, working shape and window settings, for the summary.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    timing: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 4)


class Segmenter:
    """Runs a DS U-Net on one case of any sequence subset.

    Args:
        network: module with ``forward(image [B, 4, D, H, W], modality_mask [B, 4])`` returning fused
            WT/TC/ET logits (see :func:`app.inference.model.load_network`).
        divisor: spatial sizes the network accepts are multiples of this.
        patch_size: sliding-window size; non-positive entries mean "the whole (padded) crop along
            that axis". Each window is also capped at the padded crop, so small volumes run in one.
            None (the default) runs the whole foreground crop as one window when the padded crop
            has at most ``max_window_voxels`` voxels, and ``fallback_patch_size`` windows otherwise.
            One window does a quarter of the work of 96^3 windows at overlap 0.5, which cover a
            BraTS brain about 4.4 times, and has no window seams.
        fallback_patch_size: window size when ``patch_size`` is None and the crop is too large.
        max_window_voxels: largest single window for ``patch_size=None`` (memory bound).
        overlap: sliding-window overlap fraction.
        sw_batch_size: windows per network call.
        device: where the network runs.
        amp: autocast on CUDA (ignored on CPU): bf16, or fp16 on GPUs without native bf16 (:func:`~app.engines.utils.amp_dtype`).
        spacing: resample to this voxel size (mm, RAS axes; 1 or 3 numbers, or a string of them)
            before the network and back after; None or ``"native"`` keeps the native spacing;
            ``"auto"`` uses ``training_spacing`` when the scan's voxel size differs from it by more
            than 10% along an axis (:data:`app.data.datalist.SPACING_TOLERANCE`).
        training_spacing: the voxel size the network was trained at (mm, RAS axes), or None when
            unknown (then ``"auto"`` keeps the native spacing).
        head_mask: set labels and probabilities to 0 where every given sequence is 0 (outside the
            skull-stripped head); the summary reports how much was removed.
        settings: free-form description of the network, copied into the summary.

    Raises:
        ValueError: a patch size that does not fit ``divisor``, an overlap outside ``[0, 1)``, ``sw_batch_size``
            below 1, or a bad spacing or flag.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        divisor: int,
        patch_size: Sequence[int] | None = None,
        fallback_patch_size: Sequence[int] = (96, 96, 96),
        max_window_voxels: int = 256**3,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        device: torch.device | str = "cpu",
        amp: bool = True,
        spacing: Sequence[float] | str | None = None,
        head_mask: bool = True,
        settings: Mapping[str, Any] | None = None,
        training_spacing: Sequence[float] | None = None,
    ) -> None:
        self.network = network
        self.divisor = int(divisor)
        self.patch_size = None if patch_size is None else self._checked(patch_size)
        self.fallback_patch_size = self._checked(fallback_patch_size)
        self.max_window_voxels = int(max_window_voxels)
        # named as the entry point running takes them: infer's --overlap is the batch bundle's --sw_overlap
        check_share(**{option("overlap")[2:]: overlap})
        self.overlap = float(overlap)
        check_counts(**{option("sw_batch_size")[2:]: sw_batch_size})
        self.sw_batch_size = int(sw_batch_size)
        self.device = torch.device(device)
        self.amp = parse_bool(amp, "amp") and self.device.type == "cuda"
        spacing = parse_spacing(spacing)
        self.auto_spacing = spacing == "auto"
        self.spacing = None if isinstance(spacing, str) else spacing
        self.training_spacing = None if training_spacing is None else _checked_spacing(training_spacing,
                                                                                        "training_spacing")
        self.head_mask = parse_bool(head_mask, "head_mask")
        self.settings = dict(settings or {})
        self._normalize = NormalizeIntensity(nonzero=True, channel_wise=True)

    def _checked(self, patch_size: Sequence[int]) -> list[int]:
        check_patch_size(patch_size, self.divisor, whole_axis=True, cli=True)
        return [int(p) for p in patch_size]

    def roi_size(self, shape: Sequence[int]) -> list[int]:
        """Window size for a crop of spatial ``shape`` (see ``patch_size``)."""
        padded = [math.ceil(int(s) / self.divisor) * self.divisor for s in shape]
        patch = self.patch_size
        if patch is None:
            patch = [0, 0, 0] if math.prod(padded) <= self.max_window_voxels else self.fallback_patch_size
        return [pad if p <= 0 else min(p, pad) for p, pad in zip(patch, padded)]

    def predict(self, case: CaseInputs, labels: str | Mapping[str, Sequence[int]] = "auto",
                probabilities: bool = False) -> Prediction:
        """Segment ``case``; the result lies on the grid of ``case.ref``.

        Args:
            case: sequences on one grid (see :func:`app.inference.io.read_case`).
            labels: label convention name or ``--labels`` value (``auto``: by the case's file names), or
                a label map ``{"ncr": [...], "ed": [...], "et": [...]}`` (a ``dataset.json``'s).
            probabilities: also return the WT/TC/ET probability maps.

        Raises:
            CaseError: bad input found while segmenting, or the case does not fit in the memory of
                the device (a large scan, or a GPU shared with other jobs): a problem of this case,
                so that a batch reports it and goes on with the next case.
        """
        try:
            return self._predict(case, labels, probabilities)
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            message = _allocation_failure(err)
        # outside the except block, so that the failed call's tensors (held by the traceback) are freed
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        fix = "pass --device cpu, " if self.device.type == "cuda" else ""
        raise CaseError(
            f"{case.ref.source}: not enough memory on {self.device} to segment this case ({message}): {fix}pass "
            "smaller windows (--patch-size 96 96 96, batch bundle --patch_size \"[96,96,96]\"), or run it on a machine "
            "with more free memory.")

    def _check_resampled_fits(self, source: str, spacing: Sequence[float], work_shape: tuple[int, ...]) -> None:
        """Refuse a resampling whose result exceeds the memory left on the device: three copies of the resampled
        image (four float32 channels), as the resampling, the crop and the blended network output take about that
        (measured: 3.0 to 3.4 times on CPU for 134 million resampled voxels).

        The spacing may come from the checkpoint (``training_spacing``, a file from elsewhere): a model recording
        0.05 mm made a 1 mm scan 8000 times larger, and the run took memory until an allocation failed (or the
        machine's out-of-memory killer ended it, or another process), then advised smaller windows.

        Raises:
            CaseError: naming the scan, the spacing, the resampled size and the fix.
        """
        need = 3 * 4 * len(BRATS_MODALITIES) * math.prod(work_shape)
        if self.device.type == "cuda":
            room: int | None = int(torch.cuda.mem_get_info(self.device)[0])
        else:
            room = available_memory()
        if room is None or need <= room:
            return
        how = "--spacing" if self.spacing is not None else "the model's training spacing, --spacing auto"
        # only a spacing read from the checkpoint says something about the model; one the user gave does not
        damaged = ("" if self.spacing is not None
                   else " (a model that records so fine a training spacing may be damaged)")
        raise CaseError(f"{source}: resampling to {[round(float(v), 4) for v in spacing]} mm ({how}) would make this "
                        f"scan {'x'.join(str(n) for n in work_shape)} voxels (about {need / 2**30:.1f} GiB to segment), "
                        f"more than the memory left on {self.device}: pass --spacing native, or a coarser --spacing in "
                        f"mm{damaged}.")

    @torch.inference_mode()
    def _predict(self, case: CaseInputs, labels: str | Mapping[str, Sequence[int]], probabilities: bool) -> Prediction:
        convention = labels if isinstance(labels, Mapping) else label_convention(
            labels, sources=[v.source for v in case.volumes.values()])
        timing: dict[str, float] = {}
        start = time.perf_counter()
        ref = case.ref
        present = [BRATS_MODALITIES.index(s) for s in case.sequences]
        mask = case.modality_mask.to(self.device)

        # 1. RAS by permutation and flips only: exact, and exactly undone at the end
        ornt = io_orientation(ref.affine)
        ras_shape = tuple(int(s) for s in apply_orientation(np.empty(ref.shape, dtype=np.bool_), ornt).shape)
        image = torch.zeros((len(BRATS_MODALITIES), *ras_shape), dtype=torch.float32, device=self.device)
        for seq, vol in case.volumes.items():
            image[BRATS_MODALITIES.index(seq)] = reorient(upload(vol.data, self.device), ornt)
        # the foreground of step 3 on the native grid: voxels > 0 in any given sequence, as training crops
        native_foreground = (image[present] > 0).any(dim=0)
        # the head: voxels not 0 in some given sequence (z-scored exports are negative inside the brain)
        head = (image[present] != 0).any(dim=0) if self.head_mask else None
        border = {seq: border_nonzero_fraction(image[BRATS_MODALITIES.index(seq)]) for seq in case.sequences}

        # 2. optional resampling to the training spacing; align_corners=False keeps the field of view
        native = ras_spacing(ref.affine)
        spacing = self.spacing
        if self.auto_spacing and self.training_spacing is not None and spacing_differs(native, self.training_spacing):
            spacing = self.training_spacing
        work_shape = ras_shape
        if spacing is not None:
            work_shape = tuple(work_size(n, s, t) for n, s, t in zip(ras_shape, native, spacing))
            if work_shape != ras_shape:
                self._check_resampled_fits(ref.source, spacing, work_shape)
                image = F.interpolate(image[None], size=work_shape, mode="trilinear", align_corners=False)[0]

        # 3. crop to the foreground of the given sequences (voxels > 0, like CropForegroundd)
        foreground = native_foreground if work_shape == ras_shape else (image[present] > 0).any(dim=0)
        del native_foreground
        box = []
        for axis in range(3):
            hits = torch.nonzero(foreground.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
            if hits.numel() == 0:
                how = "--spacing" if self.spacing is not None else "the model's training spacing, --spacing auto"
                raise CaseError(f"{ref.source}: no voxel above 0 remains after resampling to {spacing} mm ({how}): "
                                "pass --spacing native, or a finer --spacing in mm.")
            box.append((int(hits[0]), int(hits[-1]) + 1))
        crop = image[:, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]]
        del image, foreground

        # 4. per-sequence z-score on non-zero voxels; absent channels stay zero and are never read
        crop = torch.as_tensor(self._normalize(crop), dtype=torch.float32)
        timing["preprocess_s"] = _seconds(start)

        # 5. Gaussian-blended sliding windows, each a multiple of the network divisor
        start = time.perf_counter()
        work_crop = [int(c) for c in crop.shape[1:]]
        if max(work_crop) <= self.divisor:  # the network's deepest level would hold a single voxel
            if spacing is None:
                at, fix = "at its native spacing", "check that it is a whole head scan"
            else:
                how = "--spacing" if self.spacing is not None else "the model's training spacing, --spacing auto"
                at, fix = f"at {spacing} mm ({how})", "pass a finer --spacing in mm, or --spacing native"
            raise CaseError(f"{ref.source}: {at} the head is only {'x'.join(map(str, work_crop))} voxels, too small "
                            f"for the network (more than {self.divisor} along some axis needed): {fix}.")
        roi = self.roi_size(work_crop)

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return self.network(x, mask[None].expand(x.shape[0], -1))

        dtype = amp_dtype(self.device, self.amp)
        autocast = nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)
        with autocast:
            logits = sliding_window_inference(
                crop[None], roi, self.sw_batch_size, predictor, overlap=self.overlap, mode="gaussian",
                sw_device=self.device, device=self.device,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing["network_s"] = _seconds(start)
        # a NaN logit is "no tumour" after the threshold: refuse rather than write a silent negative
        bad = int((~torch.isfinite(logits)).sum())
        if bad:
            raise CaseError(f"{ref.source}: the network gave {bad} NaN or infinite value(s) on this case, so no label "
                            "map is written: check that the model file is intact (copy it again) and that the scan's "
                            "intensities are plausible.")

        # 6. back to the input grid
        start = time.perf_counter()
        prob_crop = torch.sigmoid(torch.as_tensor(logits, dtype=torch.float32)[0])
        del logits, crop
        prob = torch.zeros((prob_crop.shape[0], *work_shape), dtype=torch.float32, device=self.device)
        prob[:, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = prob_crop
        del prob_crop
        if work_shape != ras_shape:
            prob = F.interpolate(prob[None], size=ras_shape, mode="trilinear", align_corners=False)[0]
        outside_ml = None
        if head is not None:
            # every voxel the labels would have called tumour: nested priority labels ET or TC even where WT <= 0.5
            outside_ml = round(int(((prob > 0.5).any(dim=0) & ~head).sum()) * voxel_volume_ml(ref.affine), 3)
            prob.mul_(head)
        del head
        label_ras = regions_to_labels(prob > 0.5, convention)
        back = ornt_transform(_RAS, ornt)
        label_map = reorient(label_ras, back).contiguous().cpu().numpy()  # uint8 from regions_to_labels
        prob_map = None
        if probabilities:
            prob_map = reorient(prob, back).permute(1, 2, 3, 0).contiguous().cpu().numpy()
        timing["postprocess_s"] = _seconds(start)
        details = {
            "ras_shape": list(ras_shape),
            "work_shape": list(work_shape),
            "spacing": "auto" if self.auto_spacing else self.spacing or "native",
            "training_spacing_mm": self.training_spacing,
            "work_spacing_mm": [round(float(n * s / w), 4) for n, s, w in zip(native, ras_shape, work_shape)],
            "crop_box": [list(b) for b in box],
            "roi_size": roi,
            "single_window": all(r >= c for r, c in zip(roi, work_crop)),
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
            "device": str(self.device),
            "amp_bf16": dtype == torch.bfloat16,
            "amp_dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "head_mask": self.head_mask,
            "wt_removed_outside_head_ml": outside_ml,
            "border_nonzero_fraction": border,
        }
        return Prediction(label_map, prob_map, timing, details)


def load_segmenter(
    ckpt: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    features: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    device: torch.device | str | None = None,
    amp: bool = True,
    spacing: Sequence[float] | str | None = "auto",
    max_window_voxels: int = 256**3,
    head_mask: bool = True,
) -> Segmenter:
    """Build a :class:`Segmenter` from a checkpoint, with defaults from the bundle's ``train.yaml``.

    Args:
        ckpt: ``model.pt`` state dict or exported TorchScript model.
        bundle: bundle folder (``bundles/brats_gmd``) whose ``configs/train.yaml`` gives the defaults
            of ``features``, ``patch_size``, ``overlap`` (``sw_overlap``) and ``sw_batch_size``.
        features: network widths; None reads them from the checkpoint.
        patch_size: sliding-window size (see :class:`Segmenter`); None runs the whole foreground
            crop as one window, or windows of the bundle's ``patch_size`` when the crop is larger
            than ``max_window_voxels``.
        max_window_voxels: see :class:`Segmenter`.
        overlap: window overlap; None uses the bundle's ``sw_overlap``.
        sw_batch_size: windows per call; None uses the bundle's.
        device: ``"cuda"``, ``"cpu"``, ...; None or ``"auto"`` picks CUDA when available.
        amp: bf16 autocast on CUDA.
        spacing: ``"auto"`` (the model's training spacing for scans more than 10% off it, when the
            model recorded it), ``"native"`` or None, or a working spacing in mm (see :class:`Segmenter`).
        head_mask: see :class:`Segmenter`.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint cannot be read or does not match ``features``, a device this
            machine lacks, or a bad window, overlap or spacing setting.
    """
    defaults = bundle_defaults(bundle)
    device = resolve_device(device)
    network, settings = load_network(ckpt, features=features, bundle=bundle, device=device)
    settings["checkpoint"] = os.path.abspath(os.fspath(ckpt))
    settings["checkpoint_sha256"] = checkpoint_sha256(ckpt)  # which model made a label map, whatever the file is called later
    settings["bundle_version"] = bundle_version(bundle)  # and which release segmented with it
    return Segmenter(
        network,
        divisor=settings["divisor"],
        patch_size=patch_size,
        fallback_patch_size=defaults["patch_size"],
        max_window_voxels=max_window_voxels,
        overlap=defaults["sw_overlap"] if overlap is None else overlap,
        sw_batch_size=defaults["sw_batch_size"] if sw_batch_size is None else sw_batch_size,
        device=device,
        amp=amp,
        spacing=spacing,
        head_mask=head_mask,
        settings=settings,
        training_spacing=settings.get("training_spacing"),
    )


def check_output_path(
    path: str | os.PathLike,
    kind: str,
    suffixes: Sequence[str],
    inputs: Sequence[str] = (),
    rename: str = "choose another output name",
) -> str:
    """Validate an output path before any work is done; returns it as an absolute path.

    Args:
        path: the output file.
        kind: what the messages call it (the option that named it, e.g. ``--out``).
        suffixes: accepted endings, the first one suggested.
        inputs: files the run reads; none of them may be the output.
        rename: the fix the messages give for an output that must not be written (another name, or
            in batch mode, whose names are fixed, another output folder).

    Raises:
        ValueError: wrong suffix, an existing folder, one of the inputs under any name (through a
            symlinked file or folder, or a hard link), or an existing file this product did not
            write (e.g. the case's reference segmentation, or a user's notes under a JSON output's
            name; see :func:`written_by_product`).
    """
    check_path_text(path, f"{kind} {path}")  # before abspath, which would keep a folder named '~'
    out = os.path.abspath(os.fspath(path))
    if not out.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{kind} {path} must end with {' or '.join(suffixes)}: rename it.")
    if os.path.isdir(out):
        raise ValueError(f"{kind} {path} is a folder: give a file name ending with {suffixes[0]}.")
    real_out = os.path.realpath(out)
    for inp in inputs:
        same = os.path.realpath(inp) == real_out
        if not same and os.path.exists(out) and os.path.exists(inp):
            same = os.path.samefile(inp, out)  # a hard link has its own real path
        if same:
            raise ValueError(f"{kind} {path} is also an input ({inp}): {rename} so the input is kept.")
    if out.lower().endswith((".nii", ".nii.gz", ".json")) and os.path.isfile(out):  # what written_by_product knows
        check_readable(out)  # an earlier output of another user (Docker --user) is a permission problem
        if not written_by_product(out):
            guess = "a note or a dataset description" if out.lower().endswith(".json") else \
                ("a reference segmentation, a scan, or an output edited since it was written, or a label map of a "
                 "release before 0.5.0 whose summary beside it no longer matches it")
            raise ValueError(f"{kind} {path} already exists and was not written by this product ({guess}?): "
                             f"{rename}, or move that file away first.")
    check_writable_folder(os.path.dirname(out), f"{kind} {path}")
    return out


def written_by_product(path: str | os.PathLike, case: str | None = None) -> bool:
    """Whether ``path`` is an output this product wrote, i.e. one that a rerun may replace.

    Args:
        path: a NIfTI image, recognised by the header description :func:`segment_case` gives it
            and, when the description records one, by the checksum of its voxels: viewers that save
            an edited image keep its header (ITK-SNAP, 3D Slicer), and a label map corrected by hand
            is the user's to keep; or
            a JSON file: a summary of :func:`segment_case` (an object with ``case`` and ``output``)
            or batch mode's ``inference_summary.json`` (an object with ``output_dir`` and ``results``).
        case: for a JSON file, accept only the summary of this case (batch clean-up, which must not
            take another case's summary, nor the batch's, for this case's).

    Anything else, readable or not, is the user's to keep.
    """
    path = os.fspath(path)
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
            if not isinstance(summary, dict):
                return False
            if case is not None:
                return summary.get("case") == case and "output" in summary
            return {"case", "output"} <= summary.keys() or {"output_dir", "results"} <= summary.keys()
        img = load_nifti(path)  # read once: the description, then the checksum it records
        description = bytes(img.header["descrip"])
        if not description.startswith(OUTPUT_DESCRIPTION_PREFIX.encode()):
            return False
        unedited = recorded_crc_matches(img)
        if unedited is not None:
            return unedited
        # releases before 0.5.0 recorded no checksum, so a label map of theirs corrected by hand in a viewer (which
        # keeps the header) was replaced by a rerun: it is taken for theirs only where its summary's volumes still
        # hold. Probability maps are not corrected by hand
        if not description.startswith(f"{OUTPUT_DESCRIPTION_PREFIX}labels".encode()):
            return True
        return _volumes_as_summarised(path, np.asarray(img.dataobj))
    except Exception:  # noqa: BLE001 - an unreadable file is not known to be ours
        return False


def _volumes_as_summarised(path: str, labels: np.ndarray) -> bool:
    """Whether the label map at ``path``, of a release that recorded no checksum, still has the region volumes its
    JSON summary beside it (``<name>.json``, as batch mode writes it) records for it, to the precision recorded
    (0.001 mL). Without such a summary the map cannot be told from one corrected by hand: the user's to keep."""
    stem = path[: -len(".nii.gz")] if path.lower().endswith(".nii.gz") else os.path.splitext(path)[0]
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            summary = json.load(f)
        if os.path.basename(str(summary["output"])) != os.path.basename(path):  # the folder may have moved since
            return False
        recorded = {str(k): float(v) for k, v in summary["volumes_ml"].items()}
        volumes = _volumes_ml(labels, {p: int(summary["labels"][p]) for p in LABEL_PARTS},
                              float(summary["voxel_volume_ml"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return "WT" in recorded and all(abs(volumes[k] - v) <= 5e-4 for k, v in recorded.items() if k in volumes)


#: Free-text fields of a NIfTI-1/-2 header, where converters and anonymisation-unaware tools store identifiers
#: (a patient name in ``descrip`` or ``aux_file``, an accession number in ``db_name``); outputs leave them empty.
_FREE_TEXT_FIELDS = ("data_type", "db_name", "aux_file", "intent_name", "unused_str")


def _output_image(data: np.ndarray, ref: Volume, description: str) -> nib.Nifti1Image:
    """NIfTI image on the reference grid: its affine, and its header's qform/sform codes, units, dims.

    The header description is ``description`` and the checksum of the voxels, by which
    :func:`written_by_product` tells this output from a later edit of it. Nothing else of the
    reference header's content is copied: its free-text fields (:data:`_FREE_TEXT_FIELDS`), its
    intent and its extensions (where ``dcmstack`` and other DICOM converters keep the DICOM header,
    patient name and ID included) are left out, so an output carries the geometry and no more of
    the patient's identity than its file name.
    """
    description = f"{description} crc32={voxel_crc(data)}"
    if ref.header is not None:
        header = ref.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(None, None)  # the input's intensity scaling must not apply to labels
        header["intent_code"] = 0
        header["intent_p1"] = header["intent_p2"] = header["intent_p3"] = 0.0
        for name in _FREE_TEXT_FIELDS:
            if name in header:  # NIfTI-2 has no data_type or db_name, NIfTI-1 no unused_str
                header[name] = b""
        header.extensions.clear()
        header["cal_min"], header["cal_max"] = 0.0, float(data.max()) if data.size else 0.0
        header["descrip"] = description.encode()[:79]
        # same affine as the header's best affine, so nibabel keeps qform/sform and their codes as they are;
        # a NIfTI-2 reference gives a NIfTI-2 output (a NIfTI-1 image would convert the header, warning on
        # stderr for every case)
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        return image_class(data, ref.affine, header=header)
    img = nib.Nifti1Image(data, ref.affine)  # DICOM input: mark the geometry as scanner coordinates
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode()[:79]
    return img


def _written_values(convention: str | Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The value written for each tumour part under a convention name or a ``dataset.json`` label map."""
    parts = LABEL_CONVENTIONS[convention] if isinstance(convention, str) else convention
    return {p: int(parts[p][0]) for p in LABEL_PARTS}


def _volumes_ml(labels: np.ndarray, values: Mapping[str, int], voxel_ml: float) -> dict[str, float]:
    counts = {p: int(np.count_nonzero(labels == values[p])) for p in LABEL_PARTS}
    regions = {"WT": counts["ncr"] + counts["ed"] + counts["et"], "TC": counts["ncr"] + counts["et"],
               "ET": counts["et"], "NCR": counts["ncr"], "ED": counts["ed"]}
    return {k: round(n * voxel_ml, 4) for k, n in regions.items()}


def segment_case(
    segmenter: Segmenter,
    paths: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    labels: str = "auto",
    probabilities: str | os.PathLike | None = None,
    summary: str | os.PathLike | None = None,
    resample_to: str | None = None,
    channels: Mapping[str, int] | None = None,
    case: str | None = None,
    other_inputs: Sequence[str | os.PathLike] = (),
    named_by_folder: bool = False,
    label_map: Mapping[str, Sequence[int]] | None = None,
    remove_abandoned: bool = True,
) -> dict[str, Any]:
    """Read, check, segment and write one case; every output appears atomically or not at all.

    Args:
        segmenter: see :func:`load_segmenter`.
        paths: ``{sequence: NIfTI file or DICOM folder}``, any non-empty subset.
        out: label map path (``.nii.gz`` or ``.nii``).
        labels: ``auto`` (by the file names, see :func:`label_convention`), ``2018`` (1/2/4) or ``2023`` (1/2/3).
        probabilities: optional path for the WT/TC/ET probability maps (4D float32 NIfTI).
        summary: optional path for the JSON summary.
        resample_to: sequence whose grid the others are resampled onto; None requires one grid.
        channels: ``{sequence: index}`` for sequences stored in one 4D file (MSD layout).
        case: case name for the summary.
        other_inputs: further files the case was read through (an MSD ``dataset.json``, see
            :func:`app.data.discovery.case_sources`); like ``paths``, no output may replace them.
        named_by_folder: the caller names the outputs after the case in its output folder (batch
            mode, which has no --out/--probabilities/--summary): a refused output's message then
            says to choose another output folder.
        label_map: the label values of the case's ``dataset.json`` (MSD / nnU-Net layout, see
            :func:`app.data.discovery.msd_label_map`), which ``labels="auto"`` writes, so that the
            output reads as the dataset's own labels (MSD Task01: 1 oedema, 2 non-enhancing, 3 enhancing).
        remove_abandoned: first remove the temporaries of these outputs that a killed run left
            (:meth:`~app.inference.io.AtomicOutputs.remove_abandoned`, which lists their folder). Batch
            mode removes them itself, from the one listing of its output folder it takes.

    Returns:
        The summary (also written to ``summary`` when given).

    Raises:
        CaseError / ValueError / FileNotFoundError: bad input or output paths; nothing is written.
        OutputWriteError: an output could not be written (e.g. the disk is full); the message names
            it and the fix, and nothing is written (earlier files at the output paths are untouched).
    """
    start = time.perf_counter()
    convention: str | Mapping[str, Sequence[int]] = label_convention(labels, sources=list(paths.values()))
    convention_name = convention
    if str(labels).strip().lower() == "auto" and label_map is not None:
        convention, convention_name = {p: list(label_map[p]) for p in LABEL_PARTS}, "dataset.json"
    written = _written_values(convention)
    if any(not 0 <= v <= 255 for v in written.values()):  # a dataset.json's labels: the map is uint8
        source = next((os.fspath(f) for f in other_inputs if os.fspath(f).lower().endswith(".json")), "dataset.json")
        raise CaseError(f"{source} gives the tumour parts the label values {written}, but a label map holds 0 to 255: "
                        "fix its 'labels' entry, or pass --labels 2018 to write BraTS values.")
    inputs = [os.fspath(p) for p in (*paths.values(), *other_inputs)]
    flags = ("Output",) * 3 if named_by_folder else ("--out", "--probabilities", "--summary")
    rename = "choose another output folder" if named_by_folder else "choose another output name"
    out = check_output_path(out, flags[0], (".nii.gz", ".nii"), inputs, rename)
    prob_path = summary_path = None
    if probabilities:
        prob_path = check_output_path(probabilities, flags[1], (".nii.gz", ".nii"), inputs, rename)
    if summary:
        summary_path = check_output_path(summary, flags[2], (".json",), inputs, rename)
    given = [os.path.realpath(p) for p in (out, prob_path, summary_path) if p]  # also through symlinked folders
    if len(set(given)) != len(given):
        raise ValueError("--out, --probabilities and --summary must be different files.")
    for path in (out, prob_path, summary_path) if remove_abandoned else ():
        if path:  # what a run killed while writing these outputs left behind
            AtomicOutputs.remove_abandoned(path)

    case_inputs: CaseInputs = read_case(paths, resample_to=resample_to, channels=channels)
    read_s = _seconds(start)
    pred = segmenter.predict(case_inputs, convention, probabilities=prob_path is not None)
    ref = case_inputs.ref
    voxel_ml = voxel_volume_ml(ref.affine)
    result: dict[str, Any] = {
        "case": case,
        "sequences_used": case_inputs.sequences,
        "sequences_missing": [s for s in BRATS_MODALITIES if s not in case_inputs.volumes],
        "empty_channels": case_inputs.empty_channels,
        "inputs": {s: os.path.abspath(v.source) for s, v in case_inputs.volumes.items()},
        "reference_sequence": case_inputs.reference,
        "resampled_to_reference": case_inputs.resampled,
        "resampling_coverage": case_inputs.coverage,
        "header_conflicts": case_inputs.header_conflicts,
        "output": out,
        "probabilities": prob_path,
        "label_convention": convention_name,
        "labels": written,
        "shape": list(ref.shape),
        "voxel_size_mm": [round(float(z), 6) for z in np.linalg.norm(ref.affine[:3, :3], axis=0)],
        "voxel_volume_ml": voxel_ml,
        "volumes_ml": _volumes_ml(pred.labels, written, voxel_ml),
        "network": segmenter.settings,
        "inference": pred.details,
        "timing_s": {"read_s": read_s, **pred.timing},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                 "brats_gmd": __version__, "threads": torch.get_num_threads()},
    }
    # the one-line result's notes (missing sequences, warnings), kept with the volumes they qualify: in batch
    # mode the printed line goes to a log only
    result["notes"] = summary_notes(result)
    write_start = time.perf_counter()
    writing = out  # the output being written, named when the disk refuses it
    try:
        with AtomicOutputs() as writer:
            # the sequences used, in the header a viewer shows: a label map from FLAIR alone is not one from all four
            used = "+".join(case_inputs.sequences)
            nib.save(_output_image(pred.labels, ref, f"{OUTPUT_DESCRIPTION_PREFIX}labels {convention_name} {used}"),
                     writer.temp(out))
            if prob_path is not None:
                writing = prob_path
                nib.save(_output_image(pred.probabilities, ref,
                                       f"{OUTPUT_DESCRIPTION_PREFIX}WT,TC,ET probabilities {used}"),
                         writer.temp(prob_path))
            result["timing_s"]["write_s"] = _seconds(write_start)
            result["timing_s"]["total_s"] = _seconds(start)
            if summary_path is not None:
                writing = summary_path
                with open(writer.temp(summary_path), "w", encoding="utf-8") as f:
                    json.dump(result, f, indent=2)
                    f.write("\n")
            writing = out  # the renames into place
    except OSError as err:
        raise _write_error(err, writing) from err
    return result


#: share of a volume's outer faces that may be non-zero before the scan is said not to be skull-stripped
BORDER_NONZERO_LIMIT = 0.5

#: share of a head that may lie outside another sequence's field of view before ``--resample-to`` warns
COVERAGE_LIMIT = 0.01


def border_nonzero_fraction(volume: torch.Tensor) -> float:
    """Share of the voxels on the six outer faces of a 3D volume that are not 0 (an edge voxel counts
    once per face it lies on).

    A skull-stripped scan (BraTS, and what the model was trained on) is 0 outside the brain, so its
    faces are 0 but where the brain touches a tight crop. A raw scan has noise or tissue there, and its
    whole background enters the normalisation and the head mask, so the model sees data unlike any it
    was trained on.
    """
    faces = [volume[0], volume[-1], volume[:, 0], volume[:, -1], volume[:, :, 0], volume[:, :, -1]]
    total = sum(f.numel() for f in faces)
    return round(sum(int(torch.count_nonzero(f)) for f in faces) / max(total, 1), 4)


def summary_notes(summary: Mapping[str, Any]) -> list[str]:
    """What a reader of the one-line result should know beyond the volumes (from :func:`segment_case`'s
    summary, which records them as ``notes``): missing sequences (given as all-zero channels or not given,
    and enhancing tumour estimated without T1ce), sequences resampled onto a grid whose field of view covers
    another part of the head, a scan that does not look skull-stripped, resampling, and tumour removed outside
    the head."""
    info = summary.get("inference", {})
    empty = summary.get("empty_channels", [])
    missing = summary.get("sequences_missing", [])
    notes = [f"{s} channel all zero: missing" for s in empty]
    # the volumes read the same whatever the sequences: a result from one sequence must say so
    not_given = [s for s in missing if s not in empty]
    if not_given:
        notes.append(f"{', '.join(not_given)} not given")
    if "t1ce" in missing:
        notes.append("without t1ce: enhancing tumour (ET) and tumour core (TC) estimated without a contrast scan")
    conflicts: dict[str, list[str]] = {}
    for seq, conflict in (summary.get("header_conflicts") or {}).items():
        conflicts.setdefault(conflict, []).append(seq)  # the sequences of one 4D file, or of one writer: once
    for conflict, seqs in conflicts.items():
        notes.append(f"WARNING: {', '.join(seqs)}: {conflict}; positions and volumes here follow the sform (as nibabel "
                     "and FSL read it), ITK-SNAP and 3D Slicer read the qform (when set) and pixdim")
    reference = summary.get("reference_sequence")
    for seq, share in (summary.get("resampling_coverage") or {}).items():
        # --resample-to onto a grid whose field of view differs: the volumes miss tumour outside the reference grid
        if share["head_outside_reference"] > COVERAGE_LIMIT:
            notes.append(f"WARNING: {share['head_outside_reference']:.0%} of {seq}'s head lies outside the {reference} "
                         "grid, which the label map and the volumes do not cover")
        if share["reference_head_outside"] > COVERAGE_LIMIT:
            notes.append(f"WARNING: {seq} covers {1.0 - share['reference_head_outside']:.0%} of the head on the "
                         f"{reference} grid and reads 0 elsewhere")
    raw = [s for s, share in (info.get("border_nonzero_fraction") or {}).items() if share > BORDER_NONZERO_LIMIT]
    if raw:
        notes.append(f"WARNING: {', '.join(raw)} not 0 on most of the volume's border: the scan does not look "
                     "skull-stripped, which the model needs, so expect a wrong label map")
    if info.get("work_shape") != info.get("ras_shape"):
        mm = "x".join(f"{v:g}" for v in info["work_spacing_mm"])
        notes.append(f"run at {mm} mm" + (", the model's training spacing" if info.get("spacing") == "auto" else ""))
    written = summary.get("labels") or {}
    if summary.get("label_convention") == "dataset.json":
        notes.append(f"labels of dataset.json: necrosis {written['ncr']}, oedema {written['ed']}, enhancing {written['et']}")
    elif written.get("et", 4) != 4:
        notes.append(f"enhancing tumour written as {written['et']}")
    removed = info.get("wt_removed_outside_head_ml") or 0.0
    if removed >= 0.05:
        notes.append(f"{removed:.1f} mL outside the head set to background")
    return notes

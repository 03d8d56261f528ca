"""Clinical inference: any subset of sequences in, a label map on the patient's own grid out.

Entry points: ``python -m app infer`` (:mod:`app.inference.cli`, one case), the batch bundle
``bundles/brats_gmd/configs/inference.yaml`` and the Docker entrypoint (:mod:`app.inference.batch`),
and TorchScript export (:mod:`app.inference.export`). Names are imported on first use (PEP 562) so
that ``--help`` does not pay for importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AtomicOutputs": "app.inference.io",
    "CaseInputs": "app.inference.io",
    "Volume": "app.inference.io",
    "read_case": "app.inference.io",
    "read_volume": "app.inference.io",
    "resample_to_grid": "app.inference.io",
    "sequence_name": "app.inference.io",
    "voxel_volume_ml": "app.inference.io",
    "DEFAULT_SETTINGS": "app.inference.model",
    "FusedDSUNet": "app.inference.model",
    "bundle_defaults": "app.inference.model",
    "checkpoint_features": "app.inference.model",
    "export_torchscript": "app.inference.model",
    "is_torchscript": "app.inference.model",
    "is_weights_file": "app.inference.model",
    "load_network": "app.inference.model",
    "network_from_checkpoint": "app.inference.model",
    "Prediction": "app.inference.pipeline",
    "Segmenter": "app.inference.pipeline",
    "label_convention": "app.inference.pipeline",
    "load_segmenter": "app.inference.pipeline",
    "segment_case": "app.inference.pipeline",
    "check_overrides_or_exit": "app.inference.batch",
    "load_segmenter_or_exit": "app.inference.batch",
    "run_batch": "app.inference.batch",
    "run_batch_or_exit": "app.inference.batch",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from app.inference.batch import check_overrides_or_exit, load_segmenter_or_exit, run_batch, run_batch_or_exit
    from app.inference.io import (
        AtomicOutputs,
        CaseInputs,
        Volume,
        read_case,
        read_volume,
        resample_to_grid,
        sequence_name,
        voxel_volume_ml,
    )
    from app.inference.model import (
        DEFAULT_SETTINGS,
        FusedDSUNet,
        bundle_defaults,
        checkpoint_features,
        export_torchscript,
        is_torchscript,
        is_weights_file,
        load_network,
        network_from_checkpoint,
    )
    from app.inference.pipeline import Prediction, Segmenter, label_convention, load_segmenter, segment_case


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'app.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Missing-modality segmentation and sentiment models: Dynamic Sharing networks trained with
gradient strategies (plain, modality dropout, GMD, CGGM, missing-modality prediction) and evaluated
on every modality subset."""

__all__ = ["__version__"]

__version__ = "0.1.0"

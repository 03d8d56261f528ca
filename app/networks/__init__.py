"""Subset-aware networks: per-modality outputs plus a fusion that accepts any modality mask."""

from app.networks.ds_transformer import DSTransformer, SequenceEncoder, SharedSequenceTrunk, lengths_to_padding_mask
from app.networks.ds_unet import DSUNet, ModalityEncoder, SharedDecoder, masked_mean
from app.networks.norm import InstanceNorm3d, use_reduction_instance_norm
from app.networks.heads import SegmentationProbe, SequenceProbe
from app.networks.prompted import PromptedDSTransformer, build_sentiment_network, load_pretrained

__all__ = [
    "DSUNet", "ModalityEncoder", "SharedDecoder", "masked_mean", "InstanceNorm3d", "use_reduction_instance_norm",
    "DSTransformer", "SequenceEncoder", "SharedSequenceTrunk", "lengths_to_padding_mask",
    "SequenceProbe", "SegmentationProbe",
    "PromptedDSTransformer", "build_sentiment_network", "load_pretrained",
]

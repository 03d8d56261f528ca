"""Dynamic Sharing transformer for multimodal sentiment (text, audio, vision) with missing modalities.

Each available modality is standardised, projected and encoded by its own transformer encoder
(padding masked by the modality's lengths); the *shared* trunk, a transformer encoder followed by
masked mean pooling over time and a small head, then processes every modality separately. The
per-modality predictions are fused by a mean over the available modalities, so every subset's
prediction is a cheap masked mean over one set of per-modality outputs.

The head is the last layer of the trunk and runs inside :meth:`DSTransformer.per_modality`: every
shared parameter is reached through the per-modality outputs and the fusion is parameter-free,
which is what exact GMD needs (it computes shared-parameter gradients as vector-Jacobian products
through the per-modality outputs). Its final layer is linear, so the mean of the per-modality
outputs is also the linear map of the mean of the last hidden features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from app.flags import check_counts
from app.networks.ds_unet import check_fusable, masked_mean, modality_index
from app.networks.weights import allow_missing_optional_keys
from app.subsets import MOSI_MODALITIES

__all__ = [
    "SequenceEncoder", "SharedSequenceTrunk", "DSTransformer", "by_length", "lengths_to_padding_mask", "masked_pool",
    "stack_sequences",
]


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True at padding positions (``t >= length``), as ``src_key_padding_mask`` wants."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps[None, :] >= lengths.reshape(-1, 1)


def masked_pool(h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Mean over time of ``h [n, L, hidden]`` at the non-padding steps (``padding [n, L]``, True = pad)."""
    keep = (~padding).to(h.dtype).unsqueeze(-1)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def stack_sequences(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(h [n_i, L_i, hidden], padding [n_i, L_i]), ...]`` padded to the longest ``L_i`` and stacked
    along the batch: ``(h [sum n_i, L, hidden], padding [sum n_i, L])``, the added steps marked as padding."""
    steps = max(h.shape[1] for h, _ in sequences)
    h = torch.cat([nn.functional.pad(h, (0, 0, 0, steps - h.shape[1])) for h, _ in sequences], dim=0)
    padding = torch.cat([nn.functional.pad(p, (0, steps - p.shape[1]), value=True) for _, p in sequences], dim=0)
    return h, padding


def by_length(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              sequences: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``run(h, padding)`` once per padded length: on the sequences ``[(h [n_i, L_i, hidden], padding [n_i, L_i]),
    ...]`` of each length stacked (:func:`stack_sequences`), the results concatenated along the batch in the order
    of ``sequences``.

    Stacking them all padded every sequence to the longest: MOSEI's 50 text steps went through the trunk as 500, the
    length of its audio, and a training step on a MOSEI-sized file (24 text steps beside 150 of audio and vision)
    took 1.7 (plain) to 2 (gmd) times as long. Sequences of one length (every modality of CMU-MOSI's utterance
    features, or of an aligned file) still run as one stack, as before.
    """
    groups: dict[int, list[int]] = {}
    for i, (h, _) in enumerate(sequences):
        groups.setdefault(int(h.shape[1]), []).append(i)
    if len(groups) == 1:  # one stack, without splitting its result and joining the parts again
        return run(*stack_sequences(sequences))
    parts: list[torch.Tensor | None] = [None] * len(sequences)
    for members in groups.values():
        out = run(*stack_sequences([sequences[i] for i in members]))
        for i, part in zip(members, out.split([int(sequences[i][0].shape[0]) for i in members])):
            parts[i] = part
    return torch.cat(parts, dim=0)


def _sinusoid(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sinusoidal positions ``[length, dim]``: no maximum length, no parameters."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


def _encoder(hidden: int, num_layers: int, num_heads: int, ff_mult: int, dropout: float) -> nn.Module:
    if num_layers <= 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(
        hidden, num_heads, dim_feedforward=ff_mult * hidden, dropout=dropout, activation="gelu",
        batch_first=True, norm_first=True,
    )
    # nested tensors would make padded outputs depend on the fast path; padding is pooled away anyway
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class SequenceEncoder(nn.Module):
    """Encoder of one modality: standardisation, linear projection, positions, transformer layers.

    The input mean and standard deviation are buffers (saved with the weights), set from the
    training split by :meth:`DSTransformer.set_input_statistics`; standardised inputs are clipped
    to ``[-clip, clip]`` so a few extreme openSMILE values cannot dominate.

    Args:
        in_features: feature size of the modality.
        hidden: model width.
        num_layers: transformer layers (0: projection only, enough for one vector per utterance).
        num_heads: attention heads.
        ff_mult: feed-forward width as a multiple of ``hidden``.
        dropout: dropout inside the layers and after the projection.
        input_dropout: dropout on the standardised input features.
        clip: clipping of the standardised inputs (0: none).
    """

    def __init__(
        self, in_features: int, hidden: int, num_layers: int = 1, num_heads: int = 4, ff_mult: int = 2,
        dropout: float = 0.1, input_dropout: float = 0.0, clip: float = 5.0,
    ) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.clip = float(clip)
        self.input_dropout = nn.Dropout(input_dropout)
        self.proj = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.layers = _encoder(hidden, num_layers, num_heads, ff_mult, dropout)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The token embeddings before the transformer layers: standardise, clip, project, add
        positions, dropout. ``x [n, L, D]`` -> ``[n, L, hidden]``."""
        x = (x - self.input_mean) / self.input_std
        if self.clip > 0:
            x = x.clamp(-self.clip, self.clip)
        h = self.proj(self.input_dropout(x))
        if h.shape[1] > 1:
            h = h + _sinusoid(h.shape[1], h.shape[2], h.device, h.dtype)
        return self.dropout(h)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``x [n, L, D]``, ``padding [n, L]`` (True = pad) -> ``[n, L, hidden]``."""
        h = self.embed(x)
        if isinstance(self.layers, nn.TransformerEncoder):
            h = self.layers(h, src_key_padding_mask=padding)
        return h


class SharedSequenceTrunk(nn.Module):
    """The shared trunk: transformer layers, masked mean pooling over time, then the head.

    The head is ``LayerNorm -> Dropout -> Linear`` (regression: one output; classification: one
    logit per class), so it is linear in the pooled, normalised features.

    Args:
        hidden: model width.
        out_channels: 1 for regression, the number of classes for classification.
        num_layers, num_heads, ff_mult, dropout: transformer settings (``num_layers`` may be 0).
        head_dropout: dropout before the output layer.
    """

    def __init__(
        self, hidden: int, out_channels: int = 1, num_layers: int = 1, num_heads: int = 4, ff_mult: int = 2,
        dropout: float = 0.1, head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.layers = _encoder(hidden, num_layers, num_heads, ff_mult, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(hidden, out_channels)

    def pooled(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Trunk features ``[n, hidden]`` before the output layer."""
        if isinstance(self.layers, nn.TransformerEncoder):
            h = self.layers(h, src_key_padding_mask=padding)
        return self.norm(masked_pool(h, padding))

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``h [n, L, hidden]``, ``padding [n, L]`` -> ``[n, out_channels]``."""
        return self.head(self.head_dropout(self.pooled(h, padding)))


class DSTransformer(nn.Module):
    """Dynamic Sharing network for sentiment regression or emotion classification with missing modalities.

    ``inputs`` is a dict ``{"text": [B, L_t, D_t], "audio": [B, L_a, D_a], "vision": [B, L_v, D_v],
    "<m>_lengths": [B]}`` as produced by :class:`app.data.MMSADataset` (missing lengths mean
    "full length"); ``modality_mask [B, M]`` (bool; None: the modalities given, of non-zero length)
    says which modalities each sample has, one row per sample (another shape raises a ``ValueError``).
    The output is ``[B, out_channels]``: the sentiment score, or class logits.

    Args:
        in_features: feature size of each modality, in ``modalities`` order.
        modalities: modality names (keys of ``inputs``).
        hidden: model width.
        out_channels: 1 for regression (``task="regression"``), the number of classes otherwise.
        task: ``regression`` or ``classification`` (only documents and checks ``out_channels``).
        encoder_layers: transformer layers per modality encoder.
        trunk_layers: transformer layers of the shared trunk.
        num_heads: attention heads (must divide ``hidden``).
        ff_mult: feed-forward width multiple.
        dropout: dropout in the transformer layers.
        input_dropout: dropout on the standardised input features; one value, or one per modality
            (a strong modality may need less than a weak, noisy one).
        head_dropout: dropout before the output layer.
        clip: clipping of the standardised inputs (0: none).
        fusion: ``mean`` (the mean of the per-modality outputs) or ``confidence`` (their mean
            weighted by a softmax, over the available modalities, of per-modality confidence logits).

    Raises:
        ValueError: an unknown ``fusion`` or ``task``, ``out_channels`` that do not fit the task, ``hidden`` not
            a multiple of ``num_heads``, ``in_features`` or ``input_dropout`` not one per modality, or a
            dropout outside [0, 1].
    """

    #: state-dict keys a checkpoint may lack (written before they existed): ``head_config`` records the task, the
    #: number of outputs and the fusion, which the head's shape alone does not tell apart (a regression head with
    #: confidence fusion has as many rows as a 2-class head with mean fusion)
    optional_state_keys: tuple[str, ...] = ("head_config",)
    _TASKS: tuple[str, ...] = ("regression", "classification")
    _FUSIONS: tuple[str, ...] = ("mean", "confidence")

    def __init__(
        self,
        in_features: Sequence[int] = (100, 73, 100),
        modalities: Sequence[str] = MOSI_MODALITIES,
        hidden: int = 64,
        out_channels: int = 1,
        task: str = "regression",
        encoder_layers: int = 1,
        trunk_layers: int = 1,
        num_heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.1,
        input_dropout: float | Sequence[float] = 0.0,
        head_dropout: float = 0.1,
        clip: float = 5.0,
        fusion: str = "mean",
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        if fusion not in ("mean", "confidence"):
            raise ValueError(f"--fusion {fusion!r} must be mean or confidence, e.g. --fusion confidence.")
        self.fusion = fusion
        if len(in_features) != len(self.modalities):
            raise ValueError(f"in_features {list(in_features)} needs one size per modality {list(self.modalities)}.")
        if task not in ("regression", "classification"):
            raise ValueError(f"--task {task!r} must be regression or classification, e.g. --task regression.")
        if task == "regression" and out_channels != 1:
            raise ValueError(f"--out_channels {out_channels} needs --task classification: a regression head has one "
                             "output, --out_channels 1.")
        if task == "classification" and out_channels < 2:
            raise ValueError(f"--task classification needs --out_channels N, the number of classes (>= 2), got "
                             f"{out_channels}: e.g. --out_channels 4, with --label_key classification_labels.")
        # checked here, where the settings are named: torch would fail later on a modulo by zero or an empty layer
        check_counts(hidden=hidden, num_heads=num_heads)
        check_counts(at_least=0, encoder_layers=encoder_layers, trunk_layers=trunk_layers)
        if hidden % num_heads:
            wider = -(-int(hidden) // int(num_heads)) * int(num_heads)
            raise ValueError(f"--hidden {hidden} must be a multiple of --num_heads {num_heads} (each head takes an equal "
                             f"share), e.g. --hidden {wider}.")
        for name, value in (("dropout", dropout), ("head_dropout", head_dropout), ("input_dropout", input_dropout)):
            values = np.atleast_1d(np.asarray(value, dtype=float))
            if not ((values >= 0.0) & (values <= 1.0)).all():
                raise ValueError(f"--{name} {value!r} is not a dropout probability: use values from 0 to 1.")
        self.task = task
        self.hidden, self.num_heads, self.ff_mult = int(hidden), int(num_heads), int(ff_mult)
        self.encoder_layers, self.dropout_rate = int(encoder_layers), float(dropout)
        self.in_features = tuple(int(d) for d in in_features)
        self.out_channels = int(out_channels)
        in_drop = [float(input_dropout)] * len(self.modalities) if np.isscalar(input_dropout) else list(input_dropout)
        if len(in_drop) != len(self.modalities):
            example = "[" + ",".join([str(in_drop[0])] * len(self.modalities)) + "]"
            raise ValueError(f"--input_dropout {input_dropout} needs one value or one per modality "
                             f"{list(self.modalities)}, e.g. --input_dropout \"{example}\".")
        self.encoders = nn.ModuleList(
            SequenceEncoder(d, hidden, encoder_layers, num_heads, ff_mult, dropout, p, clip)
            for d, p in zip(self.in_features, in_drop)
        )
        # with confidence fusion the head also emits each modality's confidence logit (last channel)
        self.per_modality_channels = self.out_channels + (1 if fusion == "confidence" else 0)
        self.trunk = SharedSequenceTrunk(
            hidden, self.per_modality_channels, trunk_layers, num_heads, ff_mult, dropout, head_dropout
        )
        self.register_buffer("head_config", torch.tensor(
            [self._TASKS.index(task), self.out_channels, self._FUSIONS.index(fusion)], dtype=torch.int64))
        self.register_load_state_dict_post_hook(allow_missing_optional_keys)

    @classmethod
    def describe_head(cls, config: torch.Tensor | Sequence[int]) -> tuple[str, str]:
        """``(what the head predicts, the bundle settings that build it)`` of a ``head_config`` buffer."""
        task, channels, fusion = (int(v) for v in config)
        fusion_name = cls._FUSIONS[fusion] if 0 <= fusion < len(cls._FUSIONS) else str(fusion)
        if task == 0:
            return (f"regression ({fusion_name} fusion)",
                    f"--task regression --label_key regression_labels --out_channels 1 --fusion {fusion_name}")
        return (f"classification into {channels} classes ({fusion_name} fusion)",
                f"--task classification --label_key classification_labels --out_channels {channels} "
                f"--fusion {fusion_name}")

    def check_checkpoint(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        """Refuse a checkpoint whose head was trained for another task, number of classes or fusion.

        Its weights may even fit (a regression head with confidence fusion has the rows of a 2-class head with
        mean fusion) and would then score a regression output as class logits, or the reverse, without an error.
        A checkpoint written before ``head_config`` existed is not checked here (its shapes still are).

        Raises:
            ValueError: naming the checkpoint, what it and this network predict, and the settings that fit it.
        """
        saved = state.get("head_config")
        if saved is None or tuple(saved.shape) != tuple(self.head_config.shape):
            return
        if torch.equal(saved.to(self.head_config.device), self.head_config):
            return
        (trained, settings), (configured, _) = self.describe_head(saved), self.describe_head(self.head_config)
        raise ValueError(f"Checkpoint {path} was trained for {trained}, but {configured} is configured: pass the "
                         f"settings it was trained with ({settings}), or a checkpoint trained with these.")

    @property
    def num_modalities(self) -> int:
        """Number of modalities, ``M``."""
        return len(self.modalities)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all modalities (trunk and head)."""
        return self.trunk.parameters()

    def modality_parameters(self) -> Iterator[nn.Parameter]:
        """Modality-specific parameters (the encoders)."""
        return self.encoders.parameters()

    @torch.no_grad()
    def set_input_statistics(self, stats: Mapping[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]
                             ) -> DSTransformer:
        """Set each encoder's input standardisation from ``{modality: (mean [D], std [D])}``
        (e.g. :func:`app.data.feature_statistics` of the training split); returns ``self``.

        Raises:
            ValueError: a modality has no statistics, or statistics of another feature size.
        """
        for name, encoder in zip(self.modalities, self.encoders):
            if name not in stats:
                raise ValueError(f"No input statistics for modality {name!r} (got {sorted(stats)}).")
            mean, std = (torch.as_tensor(np.asarray(v), dtype=torch.float32) for v in stats[name])
            if mean.shape != encoder.input_mean.shape or std.shape != encoder.input_std.shape:
                raise ValueError(f"Statistics of {name!r} have {tuple(mean.shape)} features, the encoder "
                                 f"expects {tuple(encoder.input_mean.shape)}.")
            encoder.input_mean.copy_(mean)
            encoder.input_std.copy_(std.clamp_min(1e-6))
        return self

    def _full_mask(self, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"DSTransformer expects a dict of modality tensors, got {type(inputs).__name__}.")
        present = [m for m in self.modalities if m in inputs]
        if not present:
            raise ValueError(f"inputs has none of the modalities {list(self.modalities)} (keys: {sorted(inputs)}).")
        first = inputs[present[0]]
        if mask is None:
            # available: given, and (where lengths are given) not of length 0, as the datasets mark it
            batch, columns = first.shape[0], []
            for m in self.modalities:
                lengths = inputs.get(f"{m}_lengths") if m in inputs else None
                columns.append(torch.full((batch,), m in inputs, device=first.device) if lengths is None
                               else lengths.to(first.device).reshape(-1) > 0)
            mask = torch.stack(columns, dim=1)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("Some samples have no modality (every given length is 0): leave them out.")
            return mask
        if tuple(mask.shape) != (first.shape[0], self.num_modalities):
            # a mask of other rows would score only its first rows (or index past the batch) without a word
            raise ValueError(f"modality_mask must be [B, {self.num_modalities}] for inputs[{present[0]!r}] "
                             f"{tuple(first.shape)}, got {tuple(mask.shape)}: give one row per sample in the batch.")
        mask = mask.to(device=first.device, dtype=torch.bool)
        absent = [m for i, m in enumerate(self.modalities) if m not in inputs and bool(mask[:, i].any())]
        if absent:
            raise ValueError(f"modality_mask marks {absent} as available but inputs has no such key.")
        return mask

    def encode(
        self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
    ) -> list[tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """Run each modality's encoder on the samples that have it.

        Returns, per present modality, ``(m, rows, (h, padding))``: the modality index, the batch
        rows that have it, the encoded sequences ``h [n, L_m, hidden]`` and their padding mask
        ``[n, L_m]`` (True = pad).
        """
        return [(m, idx, (self.encoders[m](x, padding), padding))
                for m, idx, x, padding in self.modality_inputs(inputs, modality_mask)]

    def modality_inputs(
        self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per present modality ``(m, rows, x [n, L_m, D_m] float, padding [n, L_m])``: the checked
        inputs of the samples that have it and their padding mask (True = pad), ``L_m`` the longest of
        their lengths (at least 2 where the input has more than one step).

        Raises:
            ValueError: an input is not ``[B, L, D_m]``.
        """
        mask = self._full_mask(inputs, modality_mask)
        for m, name in enumerate(self.modalities):
            idx = torch.nonzero(mask[:, m], as_tuple=False).flatten()
            if idx.numel() == 0:
                continue
            x = inputs[name][idx]
            if x.ndim == 2:  # [n, D]: one vector per sample
                x = x.unsqueeze(1)
            if x.ndim != 3 or x.shape[-1] != self.in_features[m]:
                raise ValueError(f"inputs[{name!r}] must be [B, L, {self.in_features[m]}], got {tuple(inputs[name].shape)}.")
            lengths = inputs.get(f"{name}_lengths")
            lengths = (torch.full((idx.numel(),), x.shape[1], device=x.device) if lengths is None
                       else lengths.to(x.device).reshape(-1)[idx])
            # a sample marked available always has at least one step (attention over nothing is NaN)
            lengths = lengths.clamp(1, x.shape[1])
            # only up to the batch's longest sequence: the steps after it are padding in every sample (a file pads
            # to its longest utterance); two at least, since one step reads as one vector per utterance (no positions).
            # Rounded up: the padding mask keeps every step t < length, so a length of 3.5 (lengths given as floats)
            # has four
            steps = min(x.shape[1], max(math.ceil(float(lengths.max())), 2))
            yield m, idx, x[:, :steps].float(), lengths_to_padding_mask(lengths, steps)

    def decode(
        self, encoded: list[tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]], batch_size: int,
        inputs: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-modality outputs ``[B, M, out_channels (+1 confidence logit)]`` from :meth:`encode`.

        The trunk runs on all (sample, modality) sequences, stacked along the batch, once per
        sequence length (:func:`by_length`); entries of absent modalities are zero.

        Args:
            encoded: output of :meth:`encode`.
            batch_size: ``B``.
            inputs: the inputs given to :meth:`encode`; the output takes the dtype (float32 for
                integer inputs) and device of their first tensor (needed when ``encoded`` is empty).
                Without it they come from the encoded sequences.

        Raises:
            ValueError: ``encoded`` is empty and ``inputs`` is not given.
        """
        if inputs is not None:
            first = next(iter(inputs.values()))
            dtype = first.dtype if first.is_floating_point() else torch.float32
            device = first.device
        elif encoded:
            first = encoded[0][2][0]
            dtype, device = torch.promote_types(first.dtype, torch.float32), first.device
        else:
            raise ValueError("Nothing to decode and no inputs to place the output: pass inputs=inputs.")
        out = torch.zeros(batch_size, self.num_modalities, self.per_modality_channels, device=device, dtype=dtype)
        if not encoded:
            return out
        pred = by_length(self.trunk, [seq for _, _, seq in encoded])
        return out.index_put(modality_index(encoded), pred.to(out.dtype))

    def per_modality(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Per-modality outputs ``[B, M, out_channels (+1 confidence logit)]``; absent modalities are zero.

        Encoders run only on the samples that have their modality (:meth:`encode`); the trunk then
        runs on all (sample, modality) sequences, once per sequence length (:meth:`decode`).
        """
        mask = self._full_mask(inputs, modality_mask)
        return self.decode(self.encode(inputs, mask), mask.shape[0], inputs=inputs)

    def fusion_head_weight(self) -> nn.Parameter:
        """Weight ``[out_channels (+1), hidden]`` of the shared output layer (the fusion head).

        With ``fusion="confidence"`` its last row is the confidence logit's; the first
        ``out_channels`` rows map features to the prediction.
        """
        return self.trunk.head.weight

    def make_modality_heads(self, num_layers: int = 1) -> nn.ModuleList:
        """One light prediction head per modality (probes of the encoders, not part of the network).

        Each head is ``num_layers`` self-attention layers over the encoder's sequence, masked mean
        pooling, LayerNorm and a Linear whose weight has the shape of the first ``out_channels``
        rows of :meth:`fusion_head_weight`.
        """
        from app.networks.heads import SequenceProbe  # heads build on this module's layers

        return nn.ModuleList(
            SequenceProbe(self.hidden, self.out_channels, num_layers, self.num_heads, self.ff_mult)
            for _ in self.modalities
        )

    def fuse(self, per_modality: torch.Tensor, modality_mask: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Fused prediction ``[B, out_channels]`` over the modalities in ``modality_mask`` (parameter-free).

        ``fusion="mean"``: the mean of the per-modality outputs. ``fusion="confidence"``: the mean
        weighted by the softmax, over the available modalities only, of each modality's confidence
        logit (the last channel of :meth:`per_modality`). ``check``: raise on a sample without
        modality (see :func:`app.networks.ds_unet.masked_mean`).
        """
        mask = modality_mask.to(per_modality.device, torch.bool)
        if self.fusion == "mean":
            return masked_mean(per_modality, mask, check)
        if check:
            check_fusable(mask)
        logits = per_modality[..., -1].float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).to(per_modality.dtype)
        return (per_modality[..., :-1] * weights.unsqueeze(-1)).sum(dim=1)

    def modality_weights(self, per_modality: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """Fusion weight of each modality ``[B, M]`` (0 for the absent ones): uniform for ``mean``."""
        mask = modality_mask.to(per_modality.device, torch.bool)
        if self.fusion == "mean":
            return mask.to(per_modality.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(per_modality.dtype)
        return torch.softmax(per_modality[..., -1].float().masked_fill(~mask, float("-inf")), dim=1)

    def forward(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction fused over ``modality_mask [B, M]`` (None: the modalities given, of non-zero length)."""
        mask = self._full_mask(inputs, modality_mask)
        return self.fuse(self.per_modality(inputs, mask), mask)

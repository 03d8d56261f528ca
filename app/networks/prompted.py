"""DS transformer with read-only prompts and a missing-modality embedding predictor (Kim & Kim, ECCV 2024).

:class:`PromptedDSTransformer` keeps :class:`~app.networks.DSTransformer`'s encoders, trunk and
head (same state-dict keys, so a plain checkpoint loads into it as a pretrained start) and adds:

- *read-only prompts*: ``num_prompts`` learnable tokens per modality appended to that modality's
  token sequence inside its encoder, where the prompts read the input tokens (and each other)
  while the input tokens never read the prompts, so the input representation, and every
  prediction from it, is unchanged by the prompts. This is the paper's joint pass with an
  attention mask, computed as two streams per layer (the tokens through the layer as without
  prompts, the prompts as queries over tokens and prompts: :func:`read_only_update`), which is
  the same maths but keeps the tokens bit-for-bit equal to the plain encoder's (a masked joint
  pass changes the kernels' summation order, ~1e-7) and skips the masked half of the attention.
  With ``encoder_layers=0`` (projection only) one read-only attention layer per modality
  (``prompt_readers``) lets the prompts aggregate the projected tokens;
- a *predictor* per ordered modality pair ``m -> m'``: ``Linear-GELU-Linear`` from the mean of
  modality ``m``'s prompt outputs to the embedding ``C^{m'}`` of modality ``m'``, where the
  embedding of a modality is the trunk's pooled, normalised feature that feeds the shared head.

With ``missing="predict"`` an absent modality of a sample gets the head's output on its predicted
embedding (the mean of the predictions from the sample's present modalities; with confidence
fusion its confidence logit gets a learnt per-modality offset, ``predicted_confidence``) and the
fusion runs over present and predicted modalities (:meth:`PromptedDSTransformer.completed_mask`);
``missing="skip"`` is exactly :class:`~app.networks.DSTransformer`. The ``predict`` strategy
(:class:`app.strategies.PredictStrategy`) trains it.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from app.networks.ds_transformer import DSTransformer, by_length
from app.networks.ds_unet import modality_index
from app.networks.weights import apply_state_dict, checkpoint_missing, read_state_dict

__all__ = [
    "PromptedFeatures", "PromptedDSTransformer", "read_only_update", "build_sentiment_network", "load_pretrained",
    "MISSING_MODES",
]

#: values of :attr:`PromptedDSTransformer.missing`
MISSING_MODES = ("predict", "skip")
#: state-dict prefixes of the parts a plain DSTransformer does not have
PROMPT_KEYS = ("prompts", "prompt_readers.", "predictors.", "predicted_confidence")

logger = logging.getLogger(__name__)


def read_only_update(layer: nn.TransformerEncoderLayer, tokens: torch.Tensor, prompts: torch.Tensor,
                     key_padding: torch.Tensor) -> torch.Tensor:
    """One transformer layer applied to the prompt rows only: queries are the prompts, keys and values
    the layer's inputs ``[tokens; prompts]``.

    This is the prompts' part of running ``layer`` on ``[tokens; prompts]`` with an attention mask
    that keeps the tokens from attending to the prompts; the tokens' part is ``layer(tokens)``
    itself, computed apart so that it is bit-for-bit the computation without prompts.

    Args:
        layer: a ``batch_first`` ``nn.TransformerEncoderLayer``.
        tokens: ``[n, L, hidden]`` the layer's input tokens.
        prompts: ``[n, P, hidden]`` the layer's input prompts.
        key_padding: ``[n, L + P]`` bool, True at padded tokens (never at prompts).
    """
    def _ff(x: torch.Tensor) -> torch.Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    length = tokens.shape[1]
    if layer.norm_first:
        kv = layer.norm1(torch.cat([tokens, prompts], dim=1))
        attn = layer.self_attn(kv[:, length:], kv, kv, key_padding_mask=key_padding, need_weights=False)[0]
        prompts = prompts + layer.dropout1(attn)
        return prompts + _ff(layer.norm2(prompts))
    kv = torch.cat([tokens, prompts], dim=1)
    attn = layer.self_attn(prompts, kv, kv, key_padding_mask=key_padding, need_weights=False)[0]
    prompts = layer.norm1(prompts + layer.dropout1(attn))
    return layer.norm2(prompts + _ff(prompts))


class PromptedFeatures(NamedTuple):
    """Per-modality features of a batch (entries of absent modalities are zero).

    Attributes:
        embeddings: ``C^m [B, M, hidden]``, the trunk's pooled, normalised features (head inputs).
        prompt_summaries: ``[B, M, hidden]``, the mean of each modality's prompt outputs.
        mask: ``[B, M]`` bool, the modalities that were encoded.
    """

    embeddings: torch.Tensor
    prompt_summaries: torch.Tensor
    mask: torch.Tensor


class PromptedDSTransformer(DSTransformer):
    """:class:`~app.networks.DSTransformer` with read-only prompts and missing-modality prediction.

    Takes every argument of :class:`~app.networks.DSTransformer`, plus:

    Args:
        num_prompts: prompt tokens per modality.
        predictor_hidden: hidden width of each pair predictor (``None`` or 0: ``2 * hidden``).
        missing: ``predict`` (absent modalities get the prediction from their predicted embedding
            and take part in the fusion) or ``skip`` (fuse the present modalities only, as
            :class:`~app.networks.DSTransformer`). An attribute: switch it at evaluation.

    Raises:
        ValueError: ``num_prompts`` below 1, a negative ``predictor_hidden``, fewer than 2 modalities, or an
            unknown ``missing`` (and as :class:`~app.networks.DSTransformer`).
    """

    def __init__(
        self, *args: Any, num_prompts: int = 4, predictor_hidden: int | None = None, missing: str = "predict",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        hidden, num_heads, ff_mult, dropout = self.hidden, self.num_heads, self.ff_mult, self.dropout_rate
        if int(num_prompts) < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
        if predictor_hidden is not None and int(predictor_hidden) < 0:  # torch's tensor-size traceback otherwise
            raise ValueError(f"predictor_hidden must be >= 0 (0: 2 * hidden), got {predictor_hidden} "
                             "(--predictor_hidden 0).")
        if self.num_modalities < 2:
            raise ValueError(f"Missing-modality prediction needs at least 2 modalities, got {list(self.modalities)}.")
        self.missing = missing
        self.num_prompts = int(num_prompts)
        self.embedding_dim = int(hidden)
        self.predictor_hidden = int(predictor_hidden) if predictor_hidden else 2 * int(hidden)
        m = self.num_modalities
        # small random prompts: LayerNorm (norm_first layers) rescales them, the spread breaks symmetry
        self.prompts = nn.Parameter(0.02 * torch.randn(m, self.num_prompts, self.embedding_dim))
        if self.encoder_layers <= 0:
            # projection-only encoders have no attention for the prompts to read through: one
            # read-only layer per modality, whose input-token outputs are discarded
            self.prompt_readers = nn.ModuleList(
                nn.TransformerEncoderLayer(hidden, num_heads, dim_feedforward=ff_mult * hidden, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
                for _ in range(m)
            )
        else:
            self.prompt_readers = None
        #: ordered pairs (source m, target m'), the order of :attr:`predictors`
        self.pairs: tuple[tuple[int, int], ...] = tuple((i, j) for i in range(m) for j in range(m) if i != j)
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, self.predictor_hidden), nn.GELU(), nn.Linear(self.predictor_hidden, hidden))
            for _ in self.pairs
        )
        # confidence fusion: a learnt offset per modality added to the confidence logit of a
        # *predicted* modality, so the fusion can trust a prediction less than the real modality
        # (the head alone cannot tell a predicted embedding from a real one)
        self.predicted_confidence = nn.Parameter(torch.zeros(m)) if self.fusion == "confidence" else None

    # -- configuration ---------------------------------------------------------------------------
    @property
    def missing(self) -> str:
        """``predict`` or ``skip`` (see the class docstring)."""
        return self._missing

    @missing.setter
    def missing(self, value: str) -> None:
        """Set the mode (any case).

        Raises:
            ValueError: neither ``predict`` nor ``skip``.
        """
        value = str(value).strip().lower()
        if value not in MISSING_MODES:
            raise ValueError(f"missing must be one of {list(MISSING_MODES)}, got {value!r} (--missing predict|skip).")
        self._missing = value

    @property
    def predicts_missing(self) -> bool:
        """True when absent modalities are predicted: every subset's prediction must then come from
        ``per_modality(inputs, subset_mask)`` (evaluators branch on this)."""
        return self._missing == "predict"

    def prediction_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the missing-modality prediction: prompts, prompt readers and predictors."""
        yield self.prompts
        if self.prompt_readers is not None:
            yield from self.prompt_readers.parameters()
        yield from self.predictors.parameters()

    def completed_mask(self, modality_mask: torch.Tensor) -> torch.Tensor:
        """The modalities :meth:`fuse` must use with the output of :meth:`per_modality` for ``modality_mask``.

        ``missing="predict"``: every modality of a sample that has at least one (the absent ones
        are predicted); ``skip``: ``modality_mask`` itself.
        """
        mask = modality_mask.to(torch.bool)
        if not self.predicts_missing:
            return mask
        return mask | mask.any(dim=1, keepdim=True)

    # -- features ----------------------------------------------------------------------------------
    def encode_with_prompts(self, m: int, x: torch.Tensor, padding: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode modality ``m`` with its read-only prompts appended.

        Layer by layer, the tokens go through the encoder exactly as without prompts and the
        prompts through :func:`read_only_update` (they read the tokens and each other); with a
        projection-only encoder, the modality's prompt reader is that one read-only layer.

        Args:
            m: modality index.
            x: ``[n, L, D_m]`` float input features.
            padding: ``[n, L]`` bool, True at padding.

        Returns:
            ``(tokens [n, L, hidden], prompt_outputs [n, P, hidden])``; ``tokens`` is bit-for-bit
            ``self.encoders[m](x, padding)``.
        """
        encoder = self.encoders[m]
        h = encoder.embed(x)
        n = h.shape[0]
        prompts = self.prompts[m].to(h.dtype).expand(n, -1, -1)
        key_padding = torch.cat([padding, padding.new_zeros(n, self.num_prompts)], dim=1)
        stack = encoder.layers
        if not isinstance(stack, nn.TransformerEncoder):
            return h, read_only_update(self.prompt_readers[m], h, prompts, key_padding)
        for layer in stack.layers:
            prompts = read_only_update(layer, h, prompts, key_padding)
            h = layer(h, src_key_padding_mask=padding)
        if stack.norm is not None:
            h, prompts = stack.norm(h), stack.norm(prompts)
        return h, prompts

    def features(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
                 ) -> PromptedFeatures:
        """Embeddings ``C^m`` and prompt summaries of every present modality (the trunk once per sequence length)."""
        mask = self._full_mask(inputs, modality_mask)
        batch, m_count, dim = mask.shape[0], self.num_modalities, self.embedding_dim
        encoded, summaries = [], []
        for m, idx, x, padding in self.modality_inputs(inputs, mask):
            h, prompt_out = self.encode_with_prompts(m, x, padding)
            encoded.append((m, idx, (h, padding)))
            summaries.append(prompt_out.mean(dim=1))
        embeddings = torch.zeros(batch, m_count, dim, device=mask.device)
        prompt_summaries = torch.zeros(batch, m_count, dim, device=mask.device)
        if not encoded:
            return PromptedFeatures(embeddings, prompt_summaries, mask)
        # the prompts are stripped before the trunk: C^m does not depend on them
        pooled = by_length(self.trunk.pooled, [seq for _, _, seq in encoded])
        index = modality_index(encoded)
        embeddings = embeddings.to(pooled.dtype).index_put(index, pooled)
        prompt_summaries = prompt_summaries.to(pooled.dtype).index_put(index, torch.cat(summaries).to(pooled.dtype))
        return PromptedFeatures(embeddings, prompt_summaries, mask)

    def pair_predictions(self, prompt_summaries: torch.Tensor) -> list[torch.Tensor]:
        """``Ĉ^{m'}`` from each source ``m`` alone, ``[B, hidden]`` per pair of :attr:`pairs` (rows
        whose source is absent are meaningless: mask them)."""
        return [predictor(prompt_summaries[:, i]) for predictor, (i, _) in zip(self.predictors, self.pairs)]

    def predicted_embeddings(self, prompt_summaries: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """``Ĉ [B, M, hidden]``: for each target modality, the mean of the predictions from the
        sample's present modalities other than it (zero where there is none)."""
        mask = modality_mask.to(prompt_summaries.device, torch.bool)
        total = torch.zeros_like(prompt_summaries)
        count = torch.zeros(mask.shape, device=mask.device, dtype=prompt_summaries.dtype)
        for pred, (i, j) in zip(self.pair_predictions(prompt_summaries), self.pairs):
            present = mask[:, i].to(pred.dtype)
            total[:, j] = total[:, j] + pred * present[:, None]
            count[:, j] = count[:, j] + present
        return total / count.clamp_min(1.0).unsqueeze(-1)

    def embedding_outputs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The shared head on embeddings ``[..., hidden]`` -> ``[..., out_channels (+1)]`` (what
        :meth:`SharedSequenceTrunk.forward` applies to its pooled features)."""
        return self.trunk.head(self.trunk.head_dropout(embeddings))

    def predicted_outputs(self, predicted: torch.Tensor) -> torch.Tensor:
        """Per-modality outputs ``[B, M, out_channels (+1)]`` of predicted embeddings ``[B, M, hidden]``:
        the shared head, plus :attr:`predicted_confidence` on the confidence logit (confidence fusion)."""
        out = self.embedding_outputs(predicted)
        if self.predicted_confidence is None:
            return out
        offset = torch.zeros_like(out)
        offset[..., -1] = self.predicted_confidence.to(out.dtype)
        return out + offset

    # -- the subset protocol -------------------------------------------------------------------------
    def per_modality(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Per-modality outputs ``[B, M, out_channels (+1)]``.

        Present modalities: the head on their embedding, as :class:`DSTransformer`. Absent ones:
        the head on their predicted embedding where ``missing="predict"`` and the sample has a
        modality, zero otherwise. Fuse over :meth:`completed_mask` of the same mask.
        """
        feats = self.features(inputs, modality_mask)
        mask = feats.mask
        # the head runs on the present rows in the trunk's (modality-major) order, as DSTransformer's
        # does, so that the outputs are bit-for-bit the same (a matmul's rounding depends on its shape)
        modality_ids, rows = torch.nonzero(mask.T, as_tuple=True)
        out = feats.embeddings.new_zeros(*mask.shape, self.per_modality_channels)
        out = out.index_put((rows, modality_ids), self.embedding_outputs(feats.embeddings[rows, modality_ids]))
        fill = self.completed_mask(mask) & ~mask
        if bool(fill.any()):
            predicted = self.predicted_outputs(self.predicted_embeddings(feats.prompt_summaries, mask))
            out = torch.where(fill.unsqueeze(-1), predicted, out)
        first = next(iter(inputs.values()))
        return out.to(first.dtype) if first.is_floating_point() else out

    def forward(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction fused over ``modality_mask [B, M]`` (None: the modalities given), completed with the
        predicted modalities when :attr:`predicts_missing`."""
        mask = self._full_mask(inputs, modality_mask)
        return self.fuse(self.per_modality(inputs, mask), self.completed_mask(mask))


# -- checkpoints and the bundle's network factory -----------------------------------------------------
def build_sentiment_network(
    strategy: str = "",
    checkpoint: str | os.PathLike | None = None,
    num_prompts: int = 4,
    predictor_hidden: int | None = None,
    missing: str = "predict",
    **kwargs: Any,
) -> DSTransformer:
    """The sentiment bundle's network: :class:`PromptedDSTransformer` for the ``predict`` strategy,
    :class:`DSTransformer` otherwise (same class and state-dict keys as before for every other strategy).

    Args:
        strategy: the bundle's ``strategy``.
        checkpoint: when given and readable (evaluation), its keys decide the class and the
            prompt/predictor sizes, so a checkpoint is evaluated with the network it was trained
            with whatever ``strategy`` says.
        num_prompts, predictor_hidden, missing: :class:`PromptedDSTransformer` options.
        kwargs: :class:`DSTransformer` options.
    """
    prompted = str(strategy).strip().lower() == "predict"
    if checkpoint and os.path.isfile(os.fspath(checkpoint)):
        try:
            state = read_state_dict(checkpoint)
        except ValueError:
            state = None  # the weight loader names the problem
        if state is not None:
            prompted = "prompts" in state
            if prompted:
                num_prompts = int(state["prompts"].shape[1])
                if "predictors.0.0.weight" in state:
                    predictor_hidden = int(state["predictors.0.0.weight"].shape[0])
    if not prompted:
        # the bundles pass these to every network, so --num_prompts 8 with --strategy gmd built the plain network
        # and left no trace; a default (predictor_hidden 0 or None: twice the width) is no news
        given = {"num_prompts": num_prompts, "predictor_hidden": predictor_hidden or None, "missing": missing}
        defaults = {k: inspect.signature(build_sentiment_network).parameters[k].default for k in given}
        for option in (k for k in given if str(given[k]).strip().lower() != str(defaults[k]).lower()):
            logger.warning("%s=%s is an option of the predict strategy's network: the %s network has no prompts or "
                           "predictors, so it has no effect here.", option, given[option],
                           "checkpoint's" if checkpoint else f"{strategy or 'plain'} strategy's")
        return DSTransformer(**kwargs)
    return PromptedDSTransformer(num_prompts=num_prompts, predictor_hidden=predictor_hidden, missing=missing, **kwargs)


def load_pretrained(network: nn.Module, path: str | os.PathLike | None, map_location: Any = "cpu") -> nn.Module:
    """Initialise ``network`` from a checkpoint of a network trained before (e.g. a DSTransformer
    trained with ``plain`` or ``dropout``); a no-op when ``path`` is empty.

    Loads non-strictly in one way only: the prompts, prompt readers and predictors, which a plain
    checkpoint lacks, keep their initialisation; every other tensor must be in the checkpoint with
    its shape. The input standardisation buffers come from the checkpoint, so run it after
    ``set_input_statistics`` to keep the statistics the encoders were trained with. The path is kept as
    ``network.pretrained_path``.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, or it was trained with another network configuration.
    """
    if not path:
        return network
    if not os.path.isfile(path):  # read_state_dict's fix names --ckpt_path, a setting this run does not have
        raise checkpoint_missing(path, "pass --pretrained a model.pt written by an earlier sentiment training run "
                                 "(<output_dir>/models/model.pt), or leave it empty.")
    state = read_state_dict(path, map_location)
    apply_state_dict(network, state, path, optional_prefixes=PROMPT_KEYS,
                 fix="pass the pretraining run's network settings (--hidden, --encoder_layers, --trunk_layers, "
                 "--fusion, ...) or pretrain with these")
    # the predict strategy reads it: BitFit from the first step is meant for encoders initialised here
    network.pretrained_path = os.fspath(path)
    optional = [k for k in network.state_dict() if k.startswith(PROMPT_KEYS)]
    kept = sorted({k.split(".")[0] for k in optional if k not in state})
    logger.info("Loaded %d tensors from %s%s.", len(state), path,
                f"; {', '.join(kept)} keep their initialisation" if kept else "")
    return network

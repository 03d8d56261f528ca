"""Dedicated ridge-regression baselines for the 7 modality subsets of CMU-MOSI / MOSEI.

One ridge model per subset, on the concatenated features of the subset's modalities (sequences
are mean-pooled over their valid steps, then standardised with training statistics). The ridge
penalty of each subset is chosen on the selection split (``valid``) by its MAE, the metric the DS
model is selected on, from a log grid; the intercept is not penalised. The reported metrics are
those of the selection split, as for the DS model's best checkpoint, plus any ``--eval_split``
scored with the chosen penalties.

Three diagnostics come with it: the *late-fusion* ridge (the single-modality ridges, mean-fused over
each subset as the DS model fuses its per-modality outputs), the selection-split Acc-2 and MAE of
every penalty tried, and a *video-held-out* score inside the training split: each subset's ridge,
with its chosen penalty, refitted without a group of videos and scored on them (5 folds of
videos). It tells how far the features separate sentiment on videos a model was not fitted to,
independently of the selection split.

Usage::

    python bench/mosi_baselines.py --data_path PKL --trust_pickle true --out_dir outputs/mosi_ridge

writes ``<out_dir>/ridge_<split>.{json,csv,md,png}`` and ``ridge_late_<split>.*`` in the
``subset_metrics`` format, ``ridge_lambdas.json``, ``ridge_profile_<select split>.json`` and
``ridge_video_cv_train.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.data.mmsa import MMSA_MODALITIES, check_labels, load_mmsa, mmsa_split, video_of  # noqa: E402
from app.metrics.sentiment import SENTIMENT_METRICS, SubsetSentimentAccumulator, sentiment_metrics  # noqa: E402
from app.reports import format_table, write_subset_report  # noqa: E402
from app.subsets import all_subsets, subset_name  # noqa: E402

__all__ = ["LAMBDAS", "VIDEO_FOLDS", "video_of", "pooled_features", "fit_ridge", "ridge_baselines", "main"]

#: Ridge penalties tried for every subset.
LAMBDAS: tuple[float, ...] = tuple(float(x) for x in 10.0 ** np.arange(-2.0, 5.01, 0.25))
#: Folds of the video-held-out score inside the training split.
VIDEO_FOLDS = 5


def pooled_features(split: Mapping[str, np.ndarray], modality: str) -> np.ndarray:
    """``[N, D]``: mean of the modality's features over each sample's valid steps (float64)."""
    x, lengths = split[modality].astype(np.float64), split[f"{modality}_lengths"]
    keep = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.float64)[..., None]
    return (x * keep).sum(1) / np.maximum(keep.sum(1), 1.0)


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Ridge weights ``[D + 1]`` (last: the unpenalised intercept) by the normal equations."""
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    penalty = lam * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(a.T @ a + penalty, a.T @ y)


def _predict(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w[:-1] + w[-1]


def ridge_baselines(
    data: Mapping[str, Mapping[str, np.ndarray]],
    train_split: str = "train",
    select_split: str = "valid",
    eval_splits: Sequence[str] = (),
    lambdas: Sequence[float] = LAMBDAS,
    video_folds: int = VIDEO_FOLDS,
) -> dict[str, Any]:
    """Fit the 7 dedicated ridge models and score them, plus their late-fusion counterpart.

    ``late`` applies the Dynamic Sharing fusion rule to linear models: each subset's prediction is
    the mean of its modalities' single-modality ridge predictions (each with the penalty chosen for
    that modality alone). It is the best that mean fusion of per-modality linear predictors reaches
    without a subset-specific fit, so the gap between ``results`` and ``late`` on a subset measures
    what a jointly fitted, dedicated model gains over the fusion rule of the DS model.

    Returns:
        ``{"lambdas": {subset: lam}, "results": {split: aggregate}, "late": {split: aggregate},
        "profile": {subset: [{"lambda", "Acc2", "MAE"}, ...]}, "video_cv": {subset: metrics}}``. Each
        aggregate has the ``{"subsets", "mean_over_subsets", "worst_subset"}`` layout of
        ``subset_metrics.json``; ``profile`` lists the selection-split metrics of every penalty tried
        (how sharply Acc-2 depends on it); ``video_cv`` holds the sentiment metrics of the predictions
        for the training split's videos, each made by the ridge refitted without its fold, plus
        ``videos`` and ``folds`` (``None`` for a subset whose samples come from one video).
    """
    source = getattr(data, "source", "the data file")
    train = mmsa_split(data, train_split, source)
    splits = {name: mmsa_split(data, name, source) for name in (select_split, *eval_splits)}
    for name, split in {train_split: train, **splits}.items():
        if "regression_labels" not in split:
            raise ValueError(f"Split {name!r} of {source} has no regression_labels: the ridge baseline regresses the "
                             "sentiment score and does not apply to classification-only data.")
        check_labels(split["regression_labels"], "regression_labels", f"{source}: {name}/regression_labels")
    feats = {name: {m: pooled_features(s, m) for m in MMSA_MODALITIES} for name, s in {train_split: train, **splits}.items()}
    # as the DS evaluator does: a subset is fitted and scored on the samples that have all its modalities
    has = {name: {m: s[f"{m}_lengths"] > 0 for m in MMSA_MODALITIES} for name, s in {train_split: train, **splits}.items()}
    y_train = train["regression_labels"].astype(np.float64)
    stats = {m: (feats[train_split][m][has[train_split][m]].mean(0), feats[train_split][m][has[train_split][m]].std(0))
             for m in MMSA_MODALITIES}

    def rows(split: str, subset: Sequence[int]) -> np.ndarray:
        return np.logical_and.reduce([has[split][MMSA_MODALITIES[i]] for i in subset])

    def design(split: str, subset: Sequence[int]) -> np.ndarray:
        cols = []
        for i in subset:
            m = MMSA_MODALITIES[i]
            mean, std = stats[m]
            cols.append((feats[split][m] - mean) / np.where(std > 1e-8, std, 1.0))
        return np.concatenate(cols, axis=1)

    subsets = all_subsets(len(MMSA_MODALITIES))
    y_sel = splits[select_split]["regression_labels"]
    chosen, profile, preds, video_cv = {}, {}, {}, {}
    for subset in subsets:
        name = subset_name(subset, MMSA_MODALITIES)
        fit_rows, sel_rows = rows(train_split, subset), rows(select_split, subset)
        if not fit_rows.any() or not sel_rows.any():
            raise ValueError(f"No sample of split {train_split!r} or {select_split!r} has every modality of {name}: "
                             "the ridge baseline cannot fit or select that subset.")
        x_train, x_sel = design(train_split, subset)[fit_rows], design(select_split, subset)[sel_rows]
        best, profile[name] = None, []
        for lam in lambdas:
            w = fit_ridge(x_train, y_train[fit_rows], lam)
            scores = sentiment_metrics(_predict(x_sel, w), y_sel[sel_rows])
            profile[name].append({"lambda": float(lam), "Acc2": scores["Acc2"], "MAE": scores["MAE"]})
            if best is None or scores["MAE"] < best[0]:
                best = (scores["MAE"], lam, w)
        _, chosen[name], w = best
        preds[tuple(subset)] = {split: _predict(design(split, subset), w) for split in splits}
        video_cv[name] = _video_held_out(x_train, y_train[fit_rows], train["id"][fit_rows], chosen[name], video_folds)

    def score(predict: Any) -> dict[str, Any]:
        out = {}
        for split_name, split in splits.items():
            acc = SubsetSentimentAccumulator(MMSA_MODALITIES)
            for j, subset in enumerate(subsets):
                keep = rows(split_name, subset)
                acc.update([str(i) for i in split["id"][keep]], j, predict(subset, split_name)[keep],
                           split["regression_labels"][keep])
            out[split_name] = acc.aggregate()
        return out

    return {
        "lambdas": chosen,
        "results": score(lambda subset, split: preds[tuple(subset)][split]),
        "late": score(lambda subset, split: np.mean([preds[(i,)][split] for i in subset], axis=0)),
        "profile": profile,
        "video_cv": video_cv,
    }


def _video_held_out(x: np.ndarray, y: np.ndarray, ids: Sequence[Any], lam: float, folds: int) -> dict[str, Any] | None:
    """Sentiment metrics of out-of-fold predictions, the folds being disjoint sets of videos.

    Utterances of one video share speaker, scene and topic, so a fold of utterances would score a
    model on videos it was fitted to; the videos are shuffled with a fixed seed and dealt to the folds.
    """
    videos = np.array([video_of(i) for i in ids])
    names = np.unique(videos)
    if len(names) < 2:
        return None
    np.random.default_rng(0).shuffle(names)
    groups = np.array_split(names, min(folds, len(names)))
    pred = np.empty_like(y)
    for group in groups:
        held = np.isin(videos, group)
        pred[held] = _predict(x[held], fit_ridge(x[~held], y[~held], lam))
    return {**sentiment_metrics(pred, y), "videos": int(len(names)), "folds": len(groups)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="MMSA .pkl or converted .npz")
    parser.add_argument("--trust_pickle", default="false", help="true to allow loading a .pkl (runs code from it)")
    parser.add_argument("--out_dir", default="outputs/mosi_ridge")
    parser.add_argument("--select_split", default="valid", help="split that chooses each subset's penalty")
    parser.add_argument("--eval_split", action="append", default=[], help="extra split(s) to score")
    args = parser.parse_args(argv)
    try:
        data = load_mmsa(args.data_path, trust_pickle=args.trust_pickle)
        out = ridge_baselines(data, select_split=args.select_split, eval_splits=args.eval_split)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    for split, result in out["results"].items():
        write_subset_report(result, out_dir, stem=f"ridge_{split}", metrics=SENTIMENT_METRICS,
                            title=f"Dedicated ridge per subset, {split} split")
        print(f"## ridge, {split}\n{format_table(result, SENTIMENT_METRICS)}\n")
        late = out["late"][split]
        write_subset_report(late, out_dir, stem=f"ridge_late_{split}", metrics=SENTIMENT_METRICS,
                            title=f"Per-modality ridge, mean-fused over each subset, {split} split")
        print(f"## ridge, late fusion (mean of the single-modality ridges), {split}\n"
              f"{format_table(late, SENTIMENT_METRICS)}\n")
    (out_dir / "ridge_lambdas.json").write_text(json.dumps(out["lambdas"], indent=2) + "\n")
    (out_dir / f"ridge_profile_{args.select_split}.json").write_text(json.dumps(out["profile"], indent=2) + "\n")
    (out_dir / "ridge_video_cv_train.json").write_text(json.dumps(out["video_cv"], indent=2) + "\n")
    print("lambda per subset (chosen on %s by MAE): %s" % (args.select_split, out["lambdas"]))
    selected = out["results"][args.select_split]["subsets"]
    lines = [f"## ridge on videos held out of the train split ({VIDEO_FOLDS} folds of videos) vs the "
             f"{args.select_split} split", "", f"| subset | held-out videos Acc2 | MAE | {args.select_split} Acc2 | MAE |",
             "|---|---|---|---|---|"]
    for name, cv in out["video_cv"].items():
        held = "n/a | n/a" if cv is None else f"{cv['Acc2']:.3f} | {cv['MAE']:.3f}"
        lines.append(f"| {name} | {held} | {selected[name]['Acc2']:.3f} | {selected[name]['MAE']:.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

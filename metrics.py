"""The measurements, as pure functions of arrays: the LDS and its bootstrap, the ground truth's noise ceiling, the
paired comparison of two score sets, the removal test's effect and label-error detection quality."""

import numpy as np
import torch
from scipy.stats import mannwhitneyu, rankdata

from utils import UserError

RECALL_FRACTIONS = (0.01, 0.05, 0.1)  # of the ranked training rows


def correlation(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation of a and b along `axis` (Spearman's, given ranks); NaN where either side is constant."""
    a, b = a - a.mean(axis, keepdims=True), b - b.mean(axis, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis) / denominator, np.nan)


def per_query_correlations(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean per-query (row) Pearson and Spearman correlation of two score matrices across the training rows, over
    the queries where both are defined: how closely one scoring path reproduces another."""
    a, b = (torch.as_tensor(x).double().numpy() for x in (a, b))
    p, s = correlation(a, b, axis=1), correlation(rankdata(a, axis=1), rankdata(b, axis=1), axis=1)
    return {"pearson": float(np.nanmean(p)) if not np.isnan(p).all() else None,
            "spearman": float(np.nanmean(s)) if not np.isnan(s).all() else None,
            "undefined_rows": int(np.isnan(p).sum()), "nonfinite_scores": int((~np.isfinite(a)).sum())}


def lds_per_query(masks: np.ndarray, margins: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Spearman correlation, for each query, between predicted (masks @ scores.T) and actual margins
    over the masks. NaN where either side is constant over the masks."""
    for name, value in (("scores", scores), ("margins", margins)):
        if not np.isfinite(value).all():
            raise UserError(f"the {name} contain NaN or infinite values (a bf16 overflow or a diverged run?); "
                            f"recompute them before evaluating")
    predictions = masks.astype(np.float64) @ scores.astype(np.float64).T  # (masks, queries)
    return correlation(rankdata(predictions, axis=0), rankdata(margins, axis=0), axis=0)


def summarize(per_query: np.ndarray, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean LDS over the queries with a defined correlation, and a 95% bootstrap interval over queries."""
    valid = per_query[~np.isnan(per_query)]
    if valid.size == 0:
        raise UserError("every query has constant margins or predictions over the masks; no LDS can be computed")
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, valid.size, size=(num_bootstrap, valid.size))].mean(1)
    return {"lds": float(valid.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "sem": float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else None,
            "num_queries": int(valid.size), "constant_queries": np.flatnonzero(np.isnan(per_query)).tolist()}


def noise_ceiling(repeat_margins: np.ndarray, target_repeats: int = None) -> dict:
    """The ground truth's reliability from R >= 2 repeats per mask (masks × repeats × queries). Per query: the
    Spearman correlation r over the masks between the mean margins of two disjoint halves of the repeats (the
    first and the last floor(R/2)), stepped to the N repeats averaged into the target (Spearman–Brown,
    k = N / floor(R/2), N = R unless target_repeats is given): reliability = k r / (1 + (k - 1) r). A score's
    correlation with the averaged margins cannot exceed sqrt(reliability) on average (the noise attenuates it), so
    the ceiling is the mean over queries of sqrt(reliability), and a method reaches LDS / ceiling of what this
    ground truth can show."""
    repeats = repeat_margins.shape[1]
    target = target_repeats or repeats
    half = repeats // 2
    first, last = repeat_margins[:, :half].mean(1), repeat_margins[:, repeats - half:].mean(1)
    # a negative split-half correlation says the repeats share no measurable signal: it counts as 0
    split_half = correlation(rankdata(first, axis=0), rankdata(last, axis=0), axis=0)
    r = np.clip(split_half, 0, None)
    k = target / half
    reliability = k * r / (1 + (k - 1) * r)
    valid = ~np.isnan(reliability)
    if not valid.any():
        raise UserError("every query has constant margins over the masks; no noise ceiling can be computed")
    return {"repeats": repeats, "target_repeats": target, "split_half_spearman": float(np.mean(split_half[valid])),
            "reliability": float(np.mean(reliability[valid])),
            "ceiling": float(np.mean(np.sqrt(reliability[valid]))),
            "per_query_reliability": [None if np.isnan(v) else float(v) for v in reliability]}


def paired_difference(per_query: np.ndarray, other: np.ndarray, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """LDS(scores) - LDS(other) on the same runs, over the queries both define, with a 95% paired bootstrap
    interval (the same resampled queries for both)."""
    both = ~np.isnan(per_query) & ~np.isnan(other)
    if not both.any():
        raise UserError("no query has a defined LDS under both score sets; nothing to compare")
    difference = per_query[both] - other[both]
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, difference.size, size=(num_bootstrap, difference.size))].mean(1)
    return {"difference": float(difference.mean()),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "num_queries": int(both.sum()), "mean": float(per_query[both].mean()), "mean_other": float(other[both].mean())}


def removal_effect(runs: dict, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean change of each query's margin when its top proponents are removed, against removing as many random
    rows (paired over queries), and the fraction of queries whose margin changes sign (the prediction flips
    between right and wrong)."""
    top, random = runs["top"] - runs["full"], runs["random"] - runs["full"]

    def flips(after):
        return float(np.mean(np.sign(after) != np.sign(runs["full"])))
    return {"num_queries": len(runs["queries"]), "removed_rows": runs["removed"],
            "margin_change_top": float(top.mean()), "margin_change_random": float(random.mean()),
            "top_minus_random": paired_difference(top, random, num_bootstrap, seed),
            "flipped_top": flips(runs["top"]), "flipped_random": flips(runs["random"]), "queries": runs["queries"]}


def median_query(per_query: np.ndarray) -> int:
    valid = np.flatnonzero(~np.isnan(per_query))
    return int(valid[np.argsort(per_query[valid])[len(valid) // 2]])


def detection_quality(suspicion: np.ndarray, corrupted: list) -> dict:
    """How well ranking the rows by `suspicion` (largest first) finds the `corrupted` rows: the AUC (Mann–Whitney:
    the chance that a corrupted row ranks above an intact one, ties counting half), the recall within the top
    RECALL_FRACTIONS of the rows, and the top len(corrupted) rows."""
    bad = np.zeros(len(suspicion), dtype=bool)
    bad[corrupted] = True
    auc = mannwhitneyu(suspicion[bad], suspicion[~bad]).statistic / (bad.sum() * (~bad).sum())
    order = np.argsort(-suspicion, kind="stable")
    recall = {f"{f:g}": float(bad[order[:max(1, round(f * len(bad)))]].sum() / bad.sum()) for f in RECALL_FRACTIONS}
    return {"auc": float(auc), "recall_at": recall, "flagged": order[:len(corrupted)].tolist()}

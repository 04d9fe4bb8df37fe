"""Linear datamodeling score (LDS) of influence scores against retraining runs.

    python evaluate_lds.py --scores scores/demo/scores_ekfac_nall_qall --lds_dir lds/demo
    python evaluate_lds.py --scores scores/swag/scores_ekfac_n73536_q2000/pairwise_scores.safetensors \\
        --kronfluence_masks files/masks.pt --kronfluence_margins files/margins.pt   # kronfluence's ground truth
    python evaluate_lds.py --lds_dir lds/demo        # the ground truth alone: its noise ceiling (>= 2 repeats)

LDS = mean over queries of Spearman(masks @ scores[q], margins[:, q]): how well the summed scores
of each random training subset rank the query margins of the models retrained on those subsets.
Margins are averaged over the repeats of a mask (the first N with --num_repeats N); with two or
more repeats the ground truth's noise ceiling is reported beside the LDS (see `noise_ceiling`).
Queries whose margins (or predictions) are constant over the masks have no rank correlation: they
are listed and left out of the mean.

Writes `lds.json` (the LDS, a 95% bootstrap interval over queries, per-query values), a histogram
of per-query LDS and a predicted-vs-actual scatter for the median query, next to the scores unless
--output_dir is given, and prints the top influential training examples of --query_index.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from formats import (
    CEILING_FILE,
    HISTOGRAM_FILE,
    REMOVAL_FILE,
    REMOVAL_FULL_FILE,
    REMOVAL_RESULTS_FILE,
    RESULTS_FILE,
    SCATTER_FILE,
    load_scores,
    read_run,
    removal_scores_id,
    scores_directory,
)
from influence import print_top_examples
from metrics import (
    lds_per_query,
    median_query,
    noise_ceiling,
    paired_difference,
    per_query_correlations,
    removal_effect,
    summarize,
)
from pipeline import load_checkpoint, prepare_data, resolve_data_args
from utils import (
    ArgumentParser,
    UserError,
    at_least,
    read_json,
    run_script,
    setup_logging,
    write_json,
)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--scores", type=Path, default=None,
                        help="A scores directory written by analyze.py, or its pairwise_scores.safetensors.")
    parser.add_argument("--lds_dir", type=Path, default=None, help="Run files written by retrain.py --lds_num_masks.")
    parser.add_argument("--removal_dir", type=Path, default=None,
                        help="Instead of the LDS: the removal test's runs (retrain.py --removal_scores) for --scores.")
    parser.add_argument("--kronfluence_masks", type=Path, default=None,
                        help="kronfluence's masks.pt (num_masks × num_train) instead of --lds_dir.")
    parser.add_argument("--kronfluence_margins", type=Path, default=None,
                        help="kronfluence's margins.pt (num_masks × num_queries), with --kronfluence_masks.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Where results and plots go (default: the scores directory).")
    parser.add_argument("--num_bootstrap", type=at_least(1), default=1000,
                        help="Bootstrap resamples of the queries for the 95%% interval.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    parser.add_argument("--query_index", type=at_least(0), default=None,
                        help="Query whose top influential examples are printed (default: the median-LDS query).")
    parser.add_argument("--top_k", type=at_least(1), default=3, help="Proponents and opponents to print.")
    parser.add_argument("--compare", type=Path, default=None, metavar="OTHER_SCORES",
                        help="Another scores directory on the same rows: report LDS(--scores) - LDS(OTHER) with a "
                             "paired bootstrap interval over queries.")
    parser.add_argument("--num_repeats", type=at_least(1), default=None,
                        help="Average only the first N repeats of each mask into the target (default: all of them); "
                             "the noise ceiling still comes from all repeats, stepped to N.")
    parser.add_argument("--no_plots", action="store_true", help="Skip the plots.")
    parser.add_argument("--cost_plot", type=Path, default=None, metavar="RESULTS_JSON",
                        help="Instead of evaluating: plot LDS against GPU-minutes for every entry of a results file "
                             "(e.g. results/lds_anetcap_minilm.json) that has 'lds' and 'gpu_minutes'.")
    args = parser.parse_args(argv)
    if args.num_repeats is not None and (args.scores is None or args.lds_dir is None):
        parser.error("--num_repeats picks the target of an LDS against --lds_dir runs; give --scores and --lds_dir "
                     "(--lds_dir alone prints the ceiling for every number of repeats)")
    if args.cost_plot:
        if args.scores or args.lds_dir or args.kronfluence_masks:
            parser.error("--cost_plot replaces the evaluation; drop --scores/--lds_dir/--kronfluence_*")
        return args
    if args.scores is None and args.lds_dir is not None and not (args.kronfluence_masks or args.removal_dir
                                                                 or args.compare):
        return args  # the ground truth's noise ceiling alone
    if args.scores is None:
        parser.error("--scores is required (or --cost_plot)")
    if sum(x is not None for x in (args.lds_dir, args.kronfluence_masks, args.removal_dir)) != 1:
        parser.error("give one of --lds_dir, --kronfluence_masks/--kronfluence_margins or --removal_dir")
    if (args.kronfluence_masks is None) != (args.kronfluence_margins is None):
        parser.error("--kronfluence_masks and --kronfluence_margins go together")
    return args


# --------------------------------------------------------------------------------------------
# The score itself
# --------------------------------------------------------------------------------------------


def load_removal(removal_dir: Path, scores: Path) -> dict:
    """The removal test's margins (retrain.py --removal_scores): the control trained on every row, and per query
    the runs without its top proponents by `scores` and without as many random rows."""

    def margins(path: Path):
        run = read_run(path) if path.exists() else None
        return None if run is None else (run[0]["margins"].double().numpy(), run[1])

    full = margins(removal_dir / REMOVAL_FULL_FILE)
    if full is None:
        raise UserError(f"no readable {REMOVAL_FULL_FILE} in {removal_dir}; make the runs with retrain.py "
                        f"--removal_scores {scores} --removal_output_dir {removal_dir}")
    ident, queries, top, random, removed = removal_scores_id(scores), [], [], [], set()
    for q in range(full[0].size):
        pair = [margins(removal_dir / REMOVAL_FILE.format(query=q, condition=c)) for c in (f"top_{ident}", "random")]
        if None in pair:
            continue
        for _, meta in pair:
            if meta["settings_hash"] != full[1]["settings_hash"]:
                raise UserError(f"{removal_dir} mixes runs of other data or training settings; keep one per directory")
            removed.add(meta["removed"])
        queries.append(q)
        top.append(pair[0][0][q])
        random.append(pair[1][0][q])
    if not queries:
        raise UserError(f"{removal_dir} has no removal runs for {scores}; make them with retrain.py --removal_scores "
                        f"{scores} --removal_output_dir {removal_dir}")
    return {"queries": queries, "full": full[0][queries], "top": np.array(top), "random": np.array(random),
            "removed": int(removed.pop())}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def load_runs(lds_dir: Path):
    """Masks (num_masks × num_train), margins averaged over repeats (num_masks × num_queries), and
    what the runs say about their data and settings."""

    files = sorted(lds_dir.glob("run_m*_r*.safetensors"))
    if not files:
        raise UserError(f"no run files in {lds_dir}; make them with retrain.py --lds_num_masks N --lds_output_dir {lds_dir}")
    by_mask, settings, data = {}, set(), set()
    for f in files:
        run = read_run(f)
        if run is None:
            raise UserError(f"run file {f} is unreadable (truncated?); delete it and rerun retrain.py to redo it")
        tensors, meta = run
        if not meta or "settings_hash" not in meta or "mask" not in meta:
            raise UserError(f"{f} is not a retrain.py run file (no run metadata)")
        settings.add(meta["settings_hash"])
        data.add((meta["data"], meta.get("recipe", "null")))
        by_mask.setdefault(int(meta["mask"]), []).append(tensors)
    if len(settings) > 1:
        raise UserError(f"{lds_dir} mixes runs made with {len(settings)} different data/training settings; "
                        f"keep one experiment per directory")
    masks = np.stack([runs[0]["mask"].numpy().astype(bool) for _, runs in sorted(by_mask.items())])
    margins = np.stack([torch.stack([r["margins"] for r in runs]).mean(0).numpy() for _, runs in sorted(by_mask.items())])
    repeats = sorted({len(runs) for runs in by_mask.values()})
    per_repeat = (np.stack([torch.stack([r["margins"] for r in runs]).numpy() for _, runs in sorted(by_mask.items())])
                  if len(repeats) == 1 and repeats[0] >= 2 else None)  # masks × repeats × queries
    fingerprint, recipe = data.pop()
    return masks, margins, {"fingerprint": json.loads(fingerprint), "recipe": json.loads(recipe),
                            "num_masks": len(by_mask), "repeats": repeats, "num_runs": len(files),
                            "per_repeat_margins": per_repeat}


def load_kronfluence_files(masks_path: Path, margins_path: Path):
    def read(path):
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        value = torch.load(path, map_location="cpu", weights_only=False)  # kronfluence pickles numpy arrays
        return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    masks, margins = read(masks_path), read(margins_path)
    if masks.shape[0] != margins.shape[0]:
        raise UserError(f"{masks_path} has {masks.shape[0]} masks but {margins_path} has {margins.shape[0]} rows")
    return masks.astype(bool), margins.astype(np.float64), {"num_masks": masks.shape[0], "repeats": [1],
                                                             "per_repeat_margins": None}


def check_match(scores: np.ndarray, meta, masks: np.ndarray, margins: np.ndarray, runs: dict) -> None:
    """The scores and the runs must describe the same training set (in order) and the same queries."""
    if meta is not None and "fingerprint" in runs:
        ours, theirs = meta.get("data_fingerprint", {}), runs["fingerprint"]
        differs = [f"{key} ({ours.get(key)} in the scores, {theirs.get(key)} in the runs)"
                   for key in ("num_train", "num_queries") if ours.get(key) != theirs.get(key)]
        differs += [f"{key} rows (hash {str(ours.get(key))[:8]} in the scores, {str(theirs.get(key))[:8]} in the runs)"
                    for key in ("train", "queries") if ours.get(key) != theirs.get(key)]
        fix = "compute both with the same data flags" if differs else ""
        ours_recipe, their_recipe = meta.get("recipe"), runs.get("recipe")
        if ours_recipe and their_recipe:
            recipe_keys = [key for key in sorted(set(ours_recipe) | set(their_recipe))
                           if key != "seed" and ours_recipe.get(key) != their_recipe.get(key)]  # any seed may be scored
            differs += [f"{key} ({ours_recipe.get(key)} for the scored model, {their_recipe.get(key)} in the runs)"
                        for key in recipe_keys]
            batch = ours_recipe.get("effective_batch_size")
            if "effective_batch_size" in recipe_keys and batch is None:
                fixes = ["make the runs with the batch size the scored model was fine-tuned with (its checkpoint, "
                         "from an older train.py, does not record it)"]
            elif "effective_batch_size" in recipe_keys:  # each run trains in one process
                fixes = [f"make the runs with --per_device_train_batch_size {batch}, the scored model's effective "
                         f"batch (processes × per-device batch when it was fine-tuned under torchrun)"]
            else:
                fixes = []
            others = [key for key in recipe_keys if key != "effective_batch_size"]
            if others:
                fixes.append("make the runs with the scored model's training flags ("
                             + ", ".join(f"--{'model_name_or_path' if key == 'model' else key} {ours_recipe.get(key)}"
                                         for key in others) + ")")
            fix = "; ".join(filter(None, [fix, *fixes]))
        if differs:
            raise UserError("the scores and the LDS runs do not belong together: they differ in "
                            + "; ".join(differs) + f". {fix[0].upper() + fix[1:]}")
    if scores.shape != (margins.shape[1], masks.shape[1]):
        raise UserError(f"scores are {scores.shape[0]} queries × {scores.shape[1]} train examples but the runs have "
                        f"{margins.shape[1]} queries × {masks.shape[1]} train examples; compute both with the same data flags")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def plot(per_query: np.ndarray, masks, margins, scores, query: int, summary: dict, out_dir: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(per_query[~np.isnan(per_query)], bins=30, color="tab:blue", alpha=0.8)
    ax.axvline(summary["lds"], color="k", linestyle="--", label=f"mean {summary['lds']:.3f}")
    ax.set(xlabel="per-query Spearman correlation", ylabel="queries", title=f"LDS: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / HISTOGRAM_FILE, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))  # the histogram's size: side by side in report.py's page
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))  # scores reach 1e5: no overlapping tick labels
    ax.scatter(masks.astype(np.float64) @ scores[query].astype(np.float64), margins[:, query], s=12)
    ax.set(xlabel="predicted: sum of scores over the subset", ylabel="margin after retraining",
           title=f"median query #{query} (Spearman {per_query[query]:.3f})")
    fig.tight_layout()
    fig.savefig(out_dir / SCATTER_FILE, dpi=120)
    plt.close(fig)


def cost_entries(results: dict, prefix: str = "") -> dict:
    """name -> (gpu_minutes, lds, ci95) for every nested entry that has both figures."""
    found = {}
    for key, value in results.items():
        if isinstance(value, dict):
            if value.get("lds") is not None and value.get("gpu_minutes") is not None:
                found[prefix + key] = (value["gpu_minutes"], value["lds"], value.get("ci95"))
            else:
                found.update(cost_entries(value, prefix=prefix + (f"{key}/" if not key.startswith("_") else "")))
    return found


def plot_cost(results_file: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = cost_entries(read_json(results_file, "results"))
    if not entries:
        raise UserError(f"{results_file} has no entries with both 'lds' and 'gpu_minutes'")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors, markers = plt.get_cmap("tab20").colors, "os^vD<>p*h"
    for i, (name, (minutes, lds, ci)) in enumerate(sorted(entries.items(), key=lambda kv: kv[1][0])):
        err = None if ci is None else [[lds - ci[0]], [ci[1] - lds]]
        ax.errorbar(minutes, lds, yerr=err, fmt=markers[i % len(markers)], capsize=3, color=colors[i % len(colors)],
                    label=f"{name} ({lds:.3f})")
    ax.set(xscale="log", xlabel="GPU-minutes (fine-tune + analyze, one H200)", ylabel="LDS (95% CI)",
           title="attribution quality against cost")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = results_file.with_name(results_file.stem + "_cost.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"{len(entries)} entries plotted in {out}")
    return out


def show_examples(meta, scores: np.ndarray, query: int, top_k: int) -> None:
    """Decode the query and its top proponents and opponents, when the checkpoint is at hand."""

    if meta is None or meta.get("checkpoint") is None or not Path(meta["checkpoint"]).is_dir():
        logger.info("checkpoint not available; skipping the top influential examples")
        return
    args = resolve_data_args(argparse.Namespace(**meta["data"]))
    _, tokenizer = load_checkpoint(Path(meta["checkpoint"]))
    print_top_examples(torch.from_numpy(scores), prepare_data(args, tokenizer), tokenizer, query, top_k)


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.cost_plot:
        return plot_cost(args.cost_plot)
    if args.scores is None:
        return evaluate_ground_truth(args)
    scores, meta = load_scores(args.scores)
    scores = scores.numpy()
    if args.query_index is not None and args.query_index >= scores.shape[0]:
        raise UserError(f"--query_index {args.query_index} is outside the {scores.shape[0]} queries; "
                        f"pass one from 0 to {scores.shape[0] - 1}")
    if meta is None:
        logger.warning("no metadata beside %s: nothing shows that the scores and the runs share their training rows, "
                       "queries and recipe, so only their shapes are compared", args.scores)
    if args.removal_dir is not None:
        return evaluate_removal(args)
    return evaluate_scores(args, scores, meta)


def evaluate_scores(args, scores: np.ndarray, meta) -> dict:
    """The LDS of the scores against --lds_dir's runs (or kronfluence's files), with the noise ceiling and the
    paired comparison when they apply; writes lds.json and the plots, and prints the summary."""
    if args.lds_dir is not None:
        masks, margins, runs = load_runs(args.lds_dir)
    else:
        masks, margins, runs = load_kronfluence_files(args.kronfluence_masks, args.kronfluence_margins)
    check_match(scores, meta, masks, margins, runs)
    target_repeats = max(runs["repeats"])
    if args.num_repeats is not None and args.num_repeats != target_repeats:
        if runs["per_repeat_margins"] is None or args.num_repeats > target_repeats:
            raise UserError(f"--num_repeats {args.num_repeats} needs every mask to have at least that many repeats; "
                            f"{args.lds_dir or args.kronfluence_margins} has {runs['repeats']}: pass at most "
                            f"{min(runs['repeats'])}, or drop it")
        target_repeats = args.num_repeats
        margins = runs["per_repeat_margins"][:, :target_repeats].mean(1)

    per_query = lds_per_query(masks, margins, scores)
    summary = summarize(per_query, args.num_bootstrap, args.seed)
    if summary["constant_queries"]:
        logger.warning("%d queries have constant margins or predictions over the masks and are left out: %s",
                       len(summary["constant_queries"]), summary["constant_queries"][:20])
    extra = {}
    if runs["per_repeat_margins"] is not None:
        extra["noise_ceiling"] = noise_ceiling(runs["per_repeat_margins"], target_repeats)
    elif max(runs["repeats"]) > 1:
        logger.warning("masks have different numbers of repeats %s; no noise ceiling", runs["repeats"])
    if args.compare is not None:
        other, other_meta = load_scores(args.compare)
        check_match(other.numpy(), other_meta, masks, margins, runs)
        extra["paired"] = {"other": str(args.compare), **paired_difference(
            per_query, lds_per_query(masks, margins, other.numpy()), args.num_bootstrap, args.seed),
            "score_agreement": per_query_correlations(scores, other)}
    query = median_query(per_query) if args.query_index is None else args.query_index
    out_dir = args.output_dir or scores_directory(args.scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = meta["scores_name"] if meta else args.scores.name
    results = {**summary, "scores": str(args.scores), "runs": str(args.lds_dir or args.kronfluence_masks),
               "num_masks": runs["num_masks"], "repeats": runs["repeats"], "target_repeats": target_repeats,
               "median_query": median_query(per_query),
               "per_query": [None if np.isnan(v) else float(v) for v in per_query], **extra}
    write_json(out_dir / RESULTS_FILE, results)
    if not args.no_plots:
        plot(per_query, masks, margins, scores, results["median_query"], summary, out_dir, title)
    print_summary(results, title, out_dir, args.compare)
    show_examples(meta, scores, query, args.top_k)
    return results


def print_summary(results: dict, title: str, out_dir: Path, compare) -> None:
    summary = results
    print(f"LDS {summary['lds']:.4f}  95% CI [{summary['ci95'][0]:.4f}, {summary['ci95'][1]:.4f}]  "
          f"over {summary['num_queries']} queries and {results['num_masks']} masks  ({title}); results in {out_dir}")
    if "noise_ceiling" in results:
        ceiling = results["noise_ceiling"]
        print(f"noise ceiling {ceiling['ceiling']:.4f} (reliability {ceiling['reliability']:.4f} of the mean of "
              f"{ceiling['target_repeats']} of {ceiling['repeats']} repeats): the LDS is "
              f"{summary['lds'] / ceiling['ceiling']:.0%} of it")
    if "paired" in results:
        paired = results["paired"]
        print(f"LDS - LDS({compare.name}) = {paired['difference']:+.4f}  paired 95% CI "
              f"[{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}] over {paired['num_queries']} queries; mean "
              f"per-query Pearson of the scores {paired['score_agreement']['pearson']:.5f} "
              f"(Spearman {paired['score_agreement']['spearman']:.4f})")


def evaluate_ground_truth(args) -> dict:
    """The noise ceiling of the runs in --lds_dir, for a target of every repeat count from 1 to R."""
    _, _, runs = load_runs(args.lds_dir)
    if runs["per_repeat_margins"] is None:
        raise UserError(f"{args.lds_dir} has {runs['repeats']} repeats per mask; a noise ceiling needs the same number, "
                        f"at least 2, for every mask (retrain.py --lds_repeats 2 or more)")
    repeats = runs["per_repeat_margins"].shape[1]
    ceilings = {str(n): {k: v for k, v in noise_ceiling(runs["per_repeat_margins"], n).items()
                         if k != "per_query_reliability"} for n in range(1, repeats + 1)}
    results = {"runs": str(args.lds_dir), "num_masks": runs["num_masks"], "repeats": repeats,
               "noise_ceiling_by_target_repeats": ceilings}
    out_dir = args.output_dir or args.lds_dir
    write_json(out_dir / CEILING_FILE, results)
    for n, c in ceilings.items():
        print(f"target: mean of {n} of {repeats} repeats: reliability {c['reliability']:.4f}, noise ceiling "
              f"{c['ceiling']:.4f}")
    print(f"over {runs['num_masks']} masks; results in {out_dir / CEILING_FILE}")
    return results


def evaluate_removal(args) -> dict:
    effect = removal_effect(load_removal(args.removal_dir, args.scores), args.num_bootstrap, args.seed)
    out_dir = args.output_dir or scores_directory(args.scores)
    results = {"scores": str(args.scores), "runs": str(args.removal_dir), **effect}
    write_json(out_dir / REMOVAL_RESULTS_FILE, results)
    paired = effect["top_minus_random"]
    print(f"removing each query's top {effect['removed_rows']} proponents changes its margin by "
          f"{effect['margin_change_top']:+.4f} (as many random rows: {effect['margin_change_random']:+.4f}; "
          f"difference {paired['difference']:+.4f}, paired 95% CI [{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}]) "
          f"and flips {effect['flipped_top']:.0%} of {effect['num_queries']} predictions (random: "
          f"{effect['flipped_random']:.0%}); results in {out_dir / REMOVAL_RESULTS_FILE}")
    return results


if __name__ == "__main__":
    run_script(main)

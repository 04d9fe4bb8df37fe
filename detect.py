"""Label-error detection: how well self-influence and the training loss find the rows whose label was moved.

    python detect.py --self_scores scores/noisy/scores_self_ekfac_nall scores/noisy/scores_self_identity_nall
    python detect.py --self_scores scores/noisy/scores_self_ekfac_nall --output_dir results/cleaning

On a model trained with `train.py --label_noise`, the training rows are ranked by self-influence (each
`analyze.py --self_influence` directory given, all of the one model) and by training loss, against the rows whose
label was moved: AUC (the chance that a moved row ranks above an intact one) and recall in the top 1%, 5% and 10%
of the ranking, written to `detection.json` with each method's top-flagged rows (as many as were moved), in the
first directory unless --output_dir is given, and printed as a table.
"""

from pathlib import Path

from formats import DETECTION_FILE, load_self_scores
from metrics import RECALL_FRACTIONS, detection_quality
from utils import ArgumentParser, UserError, run_script, setup_logging, write_json


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--self_scores", type=Path, nargs="+", required=True, metavar="SELF_SCORES_DIR",
                        help="analyze.py --self_influence outputs of one model, trained with --label_noise; the "
                             "training loss is ranked beside them.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Where detection.json goes (default: the first --self_scores directory).")
    return parser.parse_args(argv)


def evaluate_detection(self_scores: list, output_dir) -> dict:
    """Detection quality of each self-influence directory and of the training loss; writes detection.json."""
    loaded = [(d, *load_self_scores(d)) for d in self_scores]
    first, _, fit, meta = loaded[0]
    corrupted = meta.get("label_noise_rows") or []
    if not corrupted:
        raise UserError(f"{first} is from a model trained without label noise, so there are no known wrong labels "
                        f"to find; train with train.py --label_noise 0.05 and analyse that checkpoint")
    methods = {}
    for d, scores, _, other in loaded:
        if other.get("data_fingerprint", {}).get("train") != meta["data_fingerprint"]["train"] or \
                other.get("checkpoint") != meta.get("checkpoint"):
            raise UserError(f"{d} scores another model or other training rows than {first}; give one model's outputs")
        methods[other["scores_name"]] = detection_quality(scores.numpy(), corrupted)
    methods["training_loss"] = detection_quality(fit["loss"].numpy(), corrupted)
    out_dir = output_dir or first
    results = {"checkpoint": meta.get("checkpoint"), "num_train": len(fit["loss"]), "num_corrupted": len(corrupted),
               "corrupted_rows": corrupted, "self_scores": [str(d) for d in self_scores], "methods": methods}
    write_json(out_dir / DETECTION_FILE, results)
    return results


def print_detection(results: dict, out_dir: Path) -> None:
    recalls = "".join(f"{f'recall@{f:.0%}':>12}" for f in RECALL_FRACTIONS)
    print(f"finding the {results['num_corrupted']} moved labels among {results['num_train']} training rows "
          f"(chance: AUC 0.5, recall = the fraction ranked)\n{'method':<44}{'AUC':>7}{recalls}")
    for name, q in results["methods"].items():
        print(f"{name:<44}{q['auc']:7.3f}" + "".join(f"{v:12.3f}" for v in q["recall_at"].values()))
    print(f"results in {out_dir / DETECTION_FILE}")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    results = evaluate_detection(args.self_scores, args.output_dir)
    print_detection(results, args.output_dir or args.self_scores[0])
    return results


if __name__ == "__main__":
    run_script(main)

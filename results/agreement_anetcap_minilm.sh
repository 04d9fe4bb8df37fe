#!/usr/bin/env bash
# --fast against kronfluence's fp32 EKFAC on the MiniLM LDS setup (one GPU; resumable: a finished model or analysis
# is reused): seed 1004 fine-tuned as in the ceiling table, scored by both at once (each with a share of the GPU's
# memory), each evaluated against the first repeat and the mean of all five of the committed ground-truth runs
# (results/ceiling_anetcap_minilm_runs), --fast paired against EKFAC (LDS difference with its bootstrap interval,
# per-query Pearson and Spearman of the scores) -> OUT_DIR/agreement.json.
# Usage: bash results/agreement_anetcap_minilm.sh MODEL_DIR DATA_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
source results/anetcap_minilm_common.sh
GROUND_TRUTH=results/ceiling_anetcap_minilm_runs; N=5
t=$(date +%s.%N)
[ -f checkpoints/s1004/model.safetensors ] || python train.py $D --seed 1004 --output_dir checkpoints/s1004 \
  > logs/train_s1004.log 2>&1
echo "seed 1004 fine-tuned: $(since "$t") s"; t=$(date +%s.%N)
analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $(gpu_share 40) > logs/scores_ekfac.txt &
analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $FAST $(gpu_share 16) > logs/fast_1004.txt &
wait; echo "EKFAC and --fast at once: $(since "$t") s"
EKFAC=$(cat logs/scores_ekfac.txt); FAST_SCORES=$(cat logs/fast_1004.txt)
for dir in "$EKFAC" "$FAST_SCORES"; do
  [ -f "$dir/metadata.json" ] || { echo "an analysis failed (logs/analyze.err)"; exit 1; }
done
for target in 1 $N; do
  for method in ekfac fast_ekfac; do
    scores=$EKFAC; [ $method = fast_ekfac ] && scores=$FAST_SCORES
    rm -rf "$OUT/lds/${method}_r$target"  # a failed evaluation leaves no earlier run's file behind
    python evaluate_lds.py --scores "$scores" --lds_dir $GROUND_TRUTH --num_repeats $target --compare "$EKFAC" \
      --no_plots --output_dir "$OUT/lds/${method}_r$target" > "logs/eval_${method}_r$target.log" 2>&1 &
  done
done; wait
grep -H "^LDS\|rror" logs/eval_*_r*.log | cut -c1-200
for target in 1 $N; do
  for method in ekfac fast_ekfac; do
    [ -f "$OUT/lds/${method}_r$target/lds.json" ] || { echo "an evaluation failed (logs/eval_*.log)"; exit 1; }
  done
done
python - "$OUT" "$N" "$FAST" "$EKFAC" "$FAST_SCORES" <<'PY'
import importlib.metadata, json, sys, time
from pathlib import Path
import torch, transformers
out, repeats, flags = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = {}
for method, scores in (("ekfac", sys.argv[4]), ("fast_ekfac", sys.argv[5])):
    meta = json.load(open(Path(scores) / "metadata.json"))
    rows[method] = {"scores": scores, "seconds": meta["seconds"]}
    for target in (1, repeats):
        r = json.load(open(out / "lds" / f"{method}_r{target}" / "lds.json"))
        rows[method][f"r{target}"] = {"lds": r["lds"], "ci95": r["ci95"], "num_queries": r["num_queries"],
                                      "paired_minus_ekfac": {k: r["paired"][k] for k in ("difference", "ci95", "score_agreement")}}
json.dump({"command": "bash results/agreement_anetcap_minilm.sh MODEL DATA OUT",
           "setup": "MiniLM (all-MiniLM-L6-v2) fine-tuned on the first 4,000 anetcap train rows (seed 1004), the first "
                    "500 validation rows as queries; 100 half-data masks x %d seeds of ground truth" % repeats,
           "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "kronfluence": importlib.metadata.version("kronfluence"), "fast_flags": flags, "rows": rows},
          open(out / "agreement.json", "w"), indent=1)
f = rows["fast_ekfac"]
print(json.dumps({f"r{t}": {"lds_fast": round(f[f"r{t}"]["lds"], 4), "lds_ekfac": round(rows["ekfac"][f"r{t}"]["lds"], 4),
                            "difference": f[f"r{t}"]["paired_minus_ekfac"]["difference"],
                            "ci95": f[f"r{t}"]["paired_minus_ekfac"]["ci95"],
                            "pearson": f[f"r{t}"]["paired_minus_ekfac"]["score_agreement"]["pearson"]} for t in (1, repeats)}))
PY

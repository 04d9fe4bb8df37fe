#!/usr/bin/env bash
# --fast against kronfluence's fp32 EKFAC on the MiniLM LDS setup (one GPU; resumable: a finished model or analysis
# is reused): seed 1004 fine-tuned as in the ceiling table, scored by kronfluence's fp32 EKFAC, by --fast, and by
# --fast with its lambda fitted on LAMBDA_ROWS random training rows (a list, default "1000 2000": a quarter and a
# half of the 4,000), and by --fast with its covariance and its lambda each fitted on its own COVARIANCE_ROWS random
# rows (a list, default none), and with FP8_CONTRACTION=1 by --fast --fp8_contraction, each evaluated against the
# first repeat and the mean of all five of the committed ground-truth runs (results/ceiling_anetcap_minilm_runs) and
# paired against EKFAC (LDS difference with its bootstrap interval, per-query Pearson and Spearman of the scores)
# -> OUT_DIR/agreement.json.
# Usage: [LAMBDA_ROWS="1000 2000"] [COVARIANCE_ROWS="1000 2000"] [FP8_CONTRACTION=1] \
#        bash results/agreement_anetcap_minilm.sh MODEL_DIR DATA_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
source results/anetcap_minilm_common.sh
GROUND_TRUTH=results/ceiling_anetcap_minilm_runs; N=5; export LAMBDA_ROWS=${LAMBDA_ROWS-1000 2000} COVARIANCE_ROWS=${COVARIANCE_ROWS-} FP8_CONTRACTION=${FP8_CONTRACTION-0}
t=$(date +%s.%N)
[ -f checkpoints/s1004/model.safetensors ] || python train.py $D --seed 1004 --output_dir checkpoints/s1004 \
  > logs/train_s1004.log 2>&1
echo "seed 1004 fine-tuned: $(since "$t") s"; t=$(date +%s.%N)
declare -A FLAGS=([ekfac]="" [fast_ekfac]="$FAST" [fast_ekfac_fp8_contraction]="$FAST --fp8_contraction")
for n in $LAMBDA_ROWS; do FLAGS[fast_ekfac_lambda$n]="$FAST --lambda_max_examples $n"; done
for n in $COVARIANCE_ROWS; do FLAGS[fast_ekfac_factors$n]="$FAST --covariance_max_examples $n --lambda_max_examples $n"; done
METHODS="ekfac fast_ekfac $([ "$FP8_CONTRACTION" != 1 ] || echo -n "fast_ekfac_fp8_contraction ")$(for n in $LAMBDA_ROWS; do echo -n "fast_ekfac_lambda$n "; done)"
METHODS+="$(for n in $COVARIANCE_ROWS; do echo -n " fast_ekfac_factors$n"; done)"
analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $(gpu_share 40) > logs/scores_ekfac.txt &
for method in $METHODS; do  # the fast analyses one after another, beside EKFAC (a failure is reported below)
  [ $method = ekfac ] || analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac ${FLAGS[$method]} \
    $(gpu_share 16) > "logs/scores_$method.txt" || true
done
wait; echo "the analyses: $(since "$t") s"
declare -A SCORES
for method in $METHODS; do
  SCORES[$method]=$(cat "logs/scores_$method.txt")
  [ -f "${SCORES[$method]}/metadata.json" ] || { echo "the $method analysis failed (logs/analyze.err)"; exit 1; }
done
EKFAC=${SCORES[ekfac]}
for target in 1 $N; do
  for method in $METHODS; do
    rm -rf "$OUT/lds/${method}_r$target"  # a failed evaluation leaves no earlier run's file behind
    python evaluate_lds.py --scores "${SCORES[$method]}" --lds_dir $GROUND_TRUTH --num_repeats $target --compare "$EKFAC" \
      --no_plots --output_dir "$OUT/lds/${method}_r$target" > "logs/eval_${method}_r$target.log" 2>&1 &
  done
done; wait
grep -H "^LDS\|rror" logs/eval_*_r*.log | cut -c1-200
for target in 1 $N; do
  for method in $METHODS; do
    [ -f "$OUT/lds/${method}_r$target/lds.json" ] || { echo "an evaluation failed (logs/eval_*.log)"; exit 1; }
  done
done
python - "$OUT" "$N" "$(for m in $METHODS; do echo -n "$m=${FLAGS[$m]}=${SCORES[$m]};"; done)" <<'PY'
import importlib.metadata, json, os, sys, time
from pathlib import Path
import torch, transformers
out, repeats = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for item in filter(None, sys.argv[3].split(";")):
    method, rest = item.split("=", 1)
    flags, scores = rest.rsplit("=", 1)
    meta = json.load(open(Path(scores) / "metadata.json"))
    rows[method] = {"flags": flags, "scores": scores, "seconds": meta["seconds"], "fitted_in_memory": meta["fitted_in_memory"]}
    for target in (1, repeats):
        r = json.load(open(out / "lds" / f"{method}_r{target}" / "lds.json"))
        rows[method][f"r{target}"] = {"lds": r["lds"], "ci95": r["ci95"], "num_queries": r["num_queries"],
                                      "paired_minus_ekfac": {k: r["paired"][k] for k in ("difference", "ci95", "score_agreement")}}
json.dump({"command": "LAMBDA_ROWS='%s' COVARIANCE_ROWS='%s' FP8_CONTRACTION=%s bash results/agreement_anetcap_minilm.sh "
                      "MODEL DATA OUT" % tuple(os.environ.get(k, "") for k in ("LAMBDA_ROWS", "COVARIANCE_ROWS",
                                                                                  "FP8_CONTRACTION")),
           "setup": "MiniLM (all-MiniLM-L6-v2) fine-tuned on the first 4,000 anetcap train rows (seed 1004), the first "
                    "500 validation rows as queries; 100 half-data masks x %d seeds of ground truth" % repeats,
           "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "kronfluence": importlib.metadata.version("kronfluence"), "rows": rows},
          open(out / "agreement.json", "w"), indent=1)
print(json.dumps({method: {f"r{t}": {"lds": round(row[f"r{t}"]["lds"], 4),
                                     "minus_ekfac": row[f"r{t}"]["paired_minus_ekfac"]["difference"],
                                     "ci95": row[f"r{t}"]["paired_minus_ekfac"]["ci95"],
                                     "pearson": row[f"r{t}"]["paired_minus_ekfac"]["score_agreement"]["pearson"]}
                           for t in (1, repeats)} for method, row in rows.items() if method != "ekfac"}, indent=1))
PY

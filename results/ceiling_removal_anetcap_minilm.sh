#!/usr/bin/env bash
# The ground truth's noise ceiling and the removal test on the MiniLM LDS setup (one GPU; every part resumes):
#   runs: the 100 half-data masks x REPEATS seeds into RUNS_DIR, stopped after SECONDS (run it again to go on;
#     the committed runs in results/lds_anetcap_minilm_runs/ carry an older settings hash, so they are not reused);
#   ceiling: finishes the runs, fine-tunes seeds 1004..1011, scores identity, KFAC, EKFAC (kronfluence, fp32) on
#     seed 1004 and fast EKFAC on every seed, combines the K = 4 and 8 ensembles, and evaluates each against the
#     first repeat and the mean of all repeats, with the noise ceiling and a paired comparison with EKFAC
#     -> OUT_DIR/ceiling.json (and fast EKFAC's scores directory with its LDS and plots -> fast_ekfac_scores.tar);
#   removal: the removal test for the first NUM_QUERIES queries, 5% of the rows, fast EKFAC against random rows
#     -> OUT_DIR/removal_ekfac/removal.json.
# Usage: bash results/ceiling_removal_anetcap_minilm.sh runs MODEL_DIR DATA_DIR RUNS_DIR [REPEATS] [NUM_PROCS] [SECONDS]
#        bash results/ceiling_removal_anetcap_minilm.sh ceiling MODEL_DIR DATA_DIR OUT_DIR RUNS_DIR [REPEATS] [NUM_PROCS]
#        bash results/ceiling_removal_anetcap_minilm.sh removal MODEL_DIR DATA_DIR OUT_DIR [NUM_QUERIES] [NUM_PROCS]
set -euo pipefail
PART=${1:?runs, ceiling or removal}; MODEL=${2:?model dir}; DATA=${3:?anetcap dir}
source results/anetcap_minilm_common.sh
ground_truth() {  # ground_truth RUNS_DIR REPEATS PROCS [SECONDS]: the runs still missing, for at most SECONDS
  local t; t=$(date +%s.%N)
  timeout "${4:-infinity}" torchrun --standalone --nproc-per-node="$3" retrain.py $D --lds_num_masks 100 \
    --lds_repeats "$2" --lds_output_dir "$1" >> logs/lds_runs.log 2>&1 || true
  echo "$(ls "$1" | grep -c '^run_m.*safetensors$') of $((100 * $2)) runs in $1 after $(since "$t") s"
}

if [ "$PART" = runs ]; then
  ground_truth "${4:?runs dir}" "${5:-5}" "${6:-8}" "${7:-infinity}"

elif [ "$PART" = ceiling ]; then
  OUT=${4:?output dir}; RUNS_DIR=${5:?runs dir}; N=${6:-5}; PROCS=${7:-8}; mkdir -p "$OUT"
  ground_truth "$RUNS_DIR" "$N" "$PROCS"
  [ "$(ls "$RUNS_DIR" | grep -c '^run_m.*safetensors$')" = $((100 * N)) ] || { echo "runs incomplete"; exit 1; }
  SEEDS=$(seq 1004 1011); t=$(date +%s.%N)
  for s in $SEEDS; do
    [ -f checkpoints/s$s/model.safetensors ] || python train.py $D --seed $s --output_dir checkpoints/s$s \
      > logs/train_s$s.log 2>&1 &
  done; wait; echo "8 seeds trained at once: $(since "$t") s"; t=$(date +%s.%N)
  # two waves sharing the GPU: 8 fast EKFAC analyses (16 GiB each: 500 MiniLM query gradients in 2 passes;
  # at 8 GiB a pass holds 10), then the 3 kronfluence strategies (40 GiB each)
  for s in $SEEDS; do
    analyze --checkpoint_dir checkpoints/s$s $A --factor_strategy ekfac $FAST $(gpu_share 16) > logs/fast_$s.txt &
  done; wait
  for strategy in identity kfac ekfac; do
    analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy $strategy $(gpu_share 40) > logs/scores_$strategy.txt &
  done
  wait; echo "8 fast EKFAC analyses, then 3 kronfluence strategies: $(since "$t") s"
  ensemble() { analyze --combine $(for s in $(seq 1004 $((1003 + $1))); do cat logs/fast_$s.txt; done); }
  declare -A METHODS=([identity]=$(cat logs/scores_identity.txt) [kfac]=$(cat logs/scores_kfac.txt)
    [ekfac]=$(cat logs/scores_ekfac.txt) [fast_ekfac]=$(cat logs/fast_1004.txt) [fast_ekfac_k4]=$(ensemble 4)
    [fast_ekfac_k8]=$(ensemble 8))
  for method in "${!METHODS[@]}"; do
    for target in 1 "$N"; do
      python evaluate_lds.py --scores "${METHODS[$method]}" --lds_dir "$RUNS_DIR" --num_repeats "$target" \
        --compare "${METHODS[ekfac]}" --no_plots --output_dir "$OUT/lds/${method}_r$target" \
        > "logs/eval_${method}_r$target.log" 2>&1 &
    done
  done; wait
  grep -H "LDS\|ceiling\|rror" logs/eval_*_r*.log | cut -c1-200
  # fast EKFAC's scores with their lds.json and plots (against all repeats), for report.py on a CPU machine
  fast=${METHODS[fast_ekfac]}
  python evaluate_lds.py --scores "$fast" --lds_dir "$RUNS_DIR" > logs/eval_plots.log 2>&1
  tar -cf "$OUT/fast_ekfac_scores.tar" -C "$(dirname "$fast")" "$(basename "$fast")"
  python - "$OUT" "$N" "$FAST" <<'PY'
import glob, importlib.metadata, json, sys, time
from pathlib import Path
import torch, transformers
out, repeats = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for f in sorted(glob.glob(f"{out}/lds/*/lds.json")):
    r = json.load(open(f))
    rows[Path(f).parent.name] = {"scores": r["scores"], "lds": r["lds"], "ci95": r["ci95"],
                                 "num_queries": r["num_queries"], "target_repeats": r["target_repeats"],
                                 "noise_ceiling": {k: v for k, v in r["noise_ceiling"].items() if k != "per_query_reliability"},
                                 "fraction_of_ceiling": r["lds"] / r["noise_ceiling"]["ceiling"],
                                 "paired_minus_ekfac": {k: r["paired"][k] for k in ("difference", "ci95", "num_queries", "score_agreement")}}
json.dump({"command": f"bash results/ceiling_removal_anetcap_minilm.sh ceiling MODEL DATA OUT RUNS_DIR {repeats}",
           "setup": "MiniLM (all-MiniLM-L6-v2) fine-tuned on the first 4,000 anetcap train rows, the first 500 "
                    "validation rows as queries; 100 half-data masks x %d seeds of ground truth" % repeats,
           "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "kronfluence": importlib.metadata.version("kronfluence"),
           "fast_ekfac_flags": sys.argv[3], "rows": rows}, open(out / "ceiling.json", "w"), indent=1)
print(json.dumps({k: (round(v["lds"], 4), round(v["fraction_of_ceiling"], 3)) for k, v in rows.items()}))
PY

else
  OUT=${4:?output dir}; N=${5:-50}; PROCS=${6:-8}; mkdir -p "$OUT"
  [ -f checkpoints/s1004/model.safetensors ] || python train.py $D --seed 1004 --output_dir checkpoints/s1004 \
    > logs/train_s1004.log 2>&1
  fast=$(analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $FAST)
  t=$(date +%s.%N)
  torchrun --standalone --nproc-per-node="$PROCS" retrain.py $D --seed 1004 --removal_scores "$fast" \
    --removal_num_queries "$N" --removal_fraction 0.05 --removal_output_dir removal/anetcap > logs/removal.log 2>&1
  echo "removal runs ($N queries): $(since "$t") s"
  python evaluate_lds.py --scores "$fast" --removal_dir removal/anetcap --output_dir "$OUT/removal_ekfac" \
    > logs/eval_removal.log 2>&1
  grep -h "removing" logs/eval_removal.log
fi

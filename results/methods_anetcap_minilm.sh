#!/usr/bin/env bash
# Cheaper ensembles and the damping, measured against the committed ground truth of the MiniLM LDS setup (one GPU;
# each part resumes: finished checkpoints and scores are reused):
#   one: fine-tunes seeds 1004..1011 with --save_epochs (at once), then on seed 1004: fast EKFAC and the 4 x 0.1
#     dropout ensemble one at a time (so their GPU seconds are their own), then its epoch-1 and epoch-2
#     checkpoints, the damping sweep and the other dropout ensembles started at once, each capped at a tenth of
#     the GPU's memory ("gpu_shared"; the final model's variants share its factors, whose lock lets them in one
#     at a time, while the two epoch models run beside them); combines the checkpoint ensembles; evaluates every method against
#     the first repeat and the mean of all repeats, paired against fast EKFAC of the same model -> OUT/one.json
#   source: SOURCE (source.py) on seed 1004 alone: fast EKFAC of its final, epoch-1 and epoch-2 models (the epoch
#     models' factors are SOURCE's earlier segments), then SOURCE at horizons 1 to 10^4 over 1 and 3 segments, and at
#     10 and 100 over 2, one at a time -> OUT/source.json (its lds.json files in OUT/lds_source)
#   seeds: fast EKFAC of the final and the epoch-1 models of all 8 seeds (8 at once; seed 1004's finished ones
#     reused), then the 8-seed ensembles of the final models, of the epoch-1 models, and of both, evaluated the
#     same way -> OUT/seeds.json (its lds.json files in OUT/lds_seeds, the one part's in OUT/lds)
# A failed step stops the part; the models go to checkpoints/methods_s<seed> (with their _epoch1, _epoch2).
# Usage: bash results/methods_anetcap_minilm.sh one|source|seeds MODEL_DIR DATA_DIR OUT_DIR RUNS_DIR [REPEATS]
set -euo pipefail
PART=${1:?one, source or seeds}; MODEL=${2:?model dir}; DATA=${3:?anetcap dir}; OUT=${4:?output dir}; RUNS_DIR=${5:?runs dir}
N=${6:-5}
LDS_OUT=$OUT/lds; [ "$PART" = one ] || LDS_OUT=$OUT/lds_$PART  # every part evaluates fast_ekfac and epoch1
source results/anetcap_minilm_common.sh
SEEDS=$(seq 1004 1011); [ "$PART" = source ] && SEEDS=1004
declare -A METHODS  # method name -> scores directories (one, or the members of an ensemble, space-separated)
declare -A SHARED   # methods whose analyses ran beside others on the GPU (their seconds include the sharing)

CK=checkpoints/methods_s
wait_all() { local pid; for pid in "$@"; do wait "$pid" || { echo "a step failed (see logs/)"; exit 1; }; done; }
train_seeds() {
  local t pids=(); t=$(date +%s.%N)
  for s in $SEEDS; do
    [ -f $CK${s}/model.safetensors ] || { python train.py $D --seed $s --save_epochs --output_dir $CK$s \
      > logs/train_s$s.log 2>&1 & pids+=($!); }
  done; wait_all "${pids[@]}"; echo "$(echo $SEEDS | wc -w) seed(s) trained at once (--save_epochs): $(since "$t") s"
}
fast() {  # fast CHECKPOINT [FLAGS]: prints the scores directory, or stops the part
  local dir; dir=$(analyze --checkpoint_dir "$1" $A --factor_strategy ekfac $FAST "${@:2}")
  [ -f "$dir/metadata.json" ] || { echo "analyze.py failed on $1 ${*:2} (logs/analyze.err)" >&2; exit 1; }
  echo "$dir"
}
combine() {
  local mode=$1 dir; shift; dir=$(analyze --combine "$@" --combine_mode "$mode")
  [ -f "$dir/metadata.json" ] || { echo "analyze.py --combine failed (logs/analyze.err)" >&2; exit 1; }
  echo "$dir"
}
evaluate() {  # every method in METHODS, paired against $PLAIN
  local pids=() method target
  for method in "${!METHODS[@]}"; do
    for target in 1 "$N"; do
      rm -rf "$LDS_OUT/${method}_r$target"
      python evaluate_lds.py --scores "${METHODS[$method]}" --lds_dir "$RUNS_DIR" --num_repeats "$target" \
        --compare "$PLAIN" --no_plots --output_dir "$LDS_OUT/${method}_r$target" \
        > "logs/eval_${PART}_${method}_r$target.log" 2>&1 & pids+=($!)
    done
  done; wait_all "${pids[@]}"
  grep -H "^LDS" logs/eval_"${PART}"_*_r*.log | cut -c1-160 || true
}
collect() {  # collect NAME: OUT/NAME.json from the lds.json files and the scores' metadata
  local method; for method in "${!METHODS[@]}"; do printf '%s\t%s\t%s\n' "$method" "${METHODS[$method]}" "${SHARED[$method]:-0}"; done \
    > "logs/methods_$1.tsv"
  python - "$OUT" "$1" "$N" "logs/methods_$1.tsv" "$LDS_OUT" <<'PY'
import importlib.metadata, json, re, sys, time
from pathlib import Path
import torch, transformers
out, name, repeats, methods_file, lds_out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
table = [line.rstrip("\n").split("\t") for line in open(methods_file)]
methods = {method: dirs for method, dirs, _ in table}
shared = {method for method, _, flag in table if flag == "1"}

def leaves(scores_dir):
    meta = json.load(open(Path(scores_dir) / "metadata.json"))
    return [leaf for m in meta["members"] for leaf in leaves(m)] if "members" in meta else [meta]

def fit_key(meta):
    return meta["checkpoint"], meta["factors_name"]

# a method that reused a fit (the damping, the dropout members) costs that fit's seconds plus its own scores
fit_seconds = {}
for first in methods.values():
    for meta in leaves(first):
        fit_seconds[fit_key(meta)] = max(fit_seconds.get(fit_key(meta), 0), meta["seconds"]["factors"])

def gpu_seconds(scores_dir):
    """Seconds of the factor fits and of the scores (analyze.py's metadata); an ensemble's: the sum over members;
    SOURCE's: the fits of all its segments' models."""
    return sum(sum(fit_seconds[(checkpoint, meta["factors_name"])]
                   for checkpoint in meta.get("source_checkpoints", [meta["checkpoint"]]))
               + meta["seconds"]["scores"] for meta in leaves(scores_dir))

def fine_tune_seconds(scores_dir):
    """train_seconds of each distinct fine-tuning run behind the scores (an epoch checkpoint is its run's)."""
    runs = {re.sub(r"_epoch[0-9]+$", "", meta["checkpoint"]) for meta in leaves(scores_dir)}
    return sum(json.load(open(Path(run) / "metrics.json"))["train_seconds"] for run in runs)

rows = {}
for method, first in sorted(methods.items()):
    row = {"scores": first, "gpu_seconds": round(gpu_seconds(first), 1),
           "fine_tune_seconds": round(fine_tune_seconds(first), 1), "gpu_shared": method in shared, "models": len({re.sub(r"_epoch[0-9]+$", "",
           meta["checkpoint"]) for meta in leaves(first)})}
    for target in (1, repeats):
        f = lds_out / f"{method}_r{target}" / "lds.json"
        r = json.load(open(f))
        row[f"r{target}"] = {"lds": r["lds"], "ci95": r["ci95"], "num_queries": r["num_queries"],
                             "ceiling": r["noise_ceiling"]["ceiling"],
                             "fraction_of_ceiling": r["lds"] / r["noise_ceiling"]["ceiling"],
                             "paired_minus_fast_ekfac": {k: r["paired"][k] for k in ("difference", "ci95", "score_agreement")}}
    rows[method] = row
json.dump({"command": f"bash results/methods_anetcap_minilm.sh {name} MODEL DATA OUT RUNS_DIR {repeats}",
           "setup": "MiniLM (all-MiniLM-L6-v2) fine-tuned on the first 4,000 anetcap train rows, the first 500 "
                    "validation rows as queries; 100 half-data masks x %d seeds of ground truth" % repeats,
           "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "kronfluence": importlib.metadata.version("kronfluence"),
           "gpu_seconds_note": "analyze.py's factor + score seconds (metadata.json; a method that reused a fit counts "
                               "that fit's seconds); ensembles: summed over members; SOURCE: the fits of every segment's model plus its own "
                               "scores (its query side preconditions in float32, plain --fast in bf16); gpu_shared: the analysis ran "
                               "with a share of the GPU's memory (--max_memory_gb) beside other analyses. "
                               "fine_tune_seconds: train.py's train_seconds of each model behind the scores (seeds "
                               "fine-tuned at once share the GPU)",
           "rows": rows}, open(out / f"{name}.json", "w"), indent=1)
print(json.dumps({k: [round(v.get("r1", {}).get("lds", float("nan")), 4), round(v.get(f"r{repeats}", {}).get("lds", float("nan")), 4), v["gpu_seconds"]] for k, v in rows.items()}))
PY
}

mkdir -p "$OUT"
train_seeds
if [ "$PART" = one ]; then
  # fast EKFAC and the 4 x 0.1 dropout ensemble alone (their GPU seconds are their own), then the rest at once
  t=$(date +%s.%N)
  PLAIN=$(fast ${CK}1004); METHODS[fast_ekfac]=$PLAIN
  METHODS[dropout_4x0.1]=$(fast ${CK}1004 --dropout_ensemble 4 --dropout_rate 0.1)
  echo "seed 1004's fast EKFAC and dropout 4 x 0.1, one at a time: $(since "$t") s"
  t=$(date +%s.%N); pids=(); declare -A FLAGS=([epoch1]="" [epoch2]="")
  for damping in 1e-6 1e-4 1e-2 1 -1; do FLAGS[damping_$damping]="--damping_factor $damping"; done
  for spec in 4:0.05 4:0.2 8:0.1; do FLAGS[dropout_${spec/:/x}]="--dropout_ensemble ${spec%:*} --dropout_rate ${spec#*:}"; done
  m=$(gpu_split ${#FLAGS[@]})
  for method in "${!FLAGS[@]}"; do
    case $method in epoch*) ck=${CK}1004_$method ;; *) ck=${CK}1004 ;; esac
    fast "$ck" ${FLAGS[$method]} $m > "logs/one_$method.txt" & pids+=($!); SHARED[$method]=1
  done; wait_all "${pids[@]}"
  for method in "${!FLAGS[@]}"; do METHODS[$method]=$(cat "logs/one_$method.txt"); done
  echo "seed 1004's other ${#FLAGS[@]} analyses, at once: $(since "$t") s"
  E1=${METHODS[epoch1]}; E2=${METHODS[epoch2]}
  combine mean "$E2" "$PLAIN" > logs/one_c1.txt & c1=$!
  combine mean "$E1" "$E2" "$PLAIN" > logs/one_c2.txt & c2=$!
  combine standardized "$E1" "$E2" "$PLAIN" > logs/one_c3.txt & c3=$!
  wait_all $c1 $c2 $c3
  METHODS[checkpoints_e23_mean]=$(cat logs/one_c1.txt); METHODS[checkpoints_e123_mean]=$(cat logs/one_c2.txt)
  METHODS[checkpoints_e123_std]=$(cat logs/one_c3.txt)
  for method in epoch1 epoch2 checkpoints_e23_mean checkpoints_e123_mean checkpoints_e123_std; do SHARED[$method]=1; done
  evaluate; collect one
elif [ "$PART" = source ]; then
  t=$(date +%s.%N)
  PLAIN=$(fast ${CK}1004); METHODS[fast_ekfac]=$PLAIN
  METHODS[epoch1]=$(fast ${CK}1004_epoch1); METHODS[epoch2]=$(fast ${CK}1004_epoch2)
  echo "seed 1004's fast EKFAC and its epoch-1 and epoch-2 models' analyses: $(since "$t") s"
  # one at a time (each holds the final model's factors while it scores), so each one's seconds are its own
  t=$(date +%s.%N)
  for T in 1 10 100 1000 10000; do METHODS[source_$T]=$(fast ${CK}1004 --source_horizon $T); done
  for T in 1 10 100 1000 10000; do METHODS[source_${T}x3]=$(fast ${CK}1004 --source_horizon $T --source_segments 3); done
  for T in 10 100; do METHODS[source_${T}x2]=$(fast ${CK}1004 --source_horizon $T --source_segments 2); done
  echo "12 SOURCE settings, one at a time: $(since "$t") s"
  evaluate; collect source
else
  t=$(date +%s.%N); pids=()
  for s in $SEEDS; do  # 8 at once, each its share of the GPU
    ( m=$(gpu_split 8); fast $CK$s $m > logs/plain_$s.txt && fast $CK$s --checkpoint_epoch 1 $m > logs/e1_$s.txt ) &
    pids+=($!)
  done; wait_all "${pids[@]}"; echo "8 seeds' final and epoch-1 analyses, at once: $(since "$t") s"
  PLAIN=$(cat logs/plain_1004.txt); METHODS[fast_ekfac]=$PLAIN; METHODS[epoch1]=$(cat logs/e1_1004.txt)
  cat_all() { local s; for s in $SEEDS; do cat "logs/$1_$s.txt"; done; }
  mapfile -t plain < <(cat_all plain); mapfile -t e1 < <(cat_all e1)
  combine standardized "${plain[@]}" > logs/seeds_c1.txt & c1=$!
  combine standardized "${e1[@]}" > logs/seeds_c2.txt & c2=$!
  combine standardized "${e1[@]}" "${plain[@]}" > logs/seeds_c3.txt & c3=$!
  wait_all $c1 $c2 $c3
  METHODS[seeds8]=$(cat logs/seeds_c1.txt); METHODS[seeds8_epoch1]=$(cat logs/seeds_c2.txt)
  METHODS[seeds8_epoch1_and_final]=$(cat logs/seeds_c3.txt)
  for method in "${!METHODS[@]}"; do SHARED[$method]=1; done
  evaluate; collect seeds
fi

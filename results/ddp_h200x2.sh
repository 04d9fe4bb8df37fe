#!/usr/bin/env bash
# Issue 5 on one host with 2 GPUs (not run yet: written for the next session's nvidia-h200-x2 call).
# MiniLM on 16,000 anetcap rows and 1,000 queries: fine-tuning, analysis (kronfluence fp32 EKFAC with the
# empirical Fisher, so both runs fit the same factors, and the fast path) and a batch of 32 LDS retraining
# runs, each on 1 GPU and on 2; writes OUT/ddp_h200x2.json.
# Usage: bash results/ddp_h200x2.sh MODEL_DIR DATA_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=2
D="--model_name_or_path $MODEL --train_file $DATA/train.csv.gz --validation_file $DATA/validation.csv.gz
   --max_train_samples 16000 --num_queries 1000 --learning_rate 5e-5 --num_train_epochs 3"
A="--factor_batch_size 128 --train_batch_size 256 --query_batch_size 250 --use_empirical_fisher"
FAST="--use_half_precision --fp32_accumulation --scoring fused"
R="--lds_num_masks 32 --lds_repeats 1 --max_train_samples 4000 --num_queries 500 --per_device_train_batch_size 32"
run2() { torchrun --standalone --nproc-per-node="$1" "${@:2}"; }
mkdir -p logs "$OUT"
CUDA_VISIBLE_DEVICES=0 python train.py $D --per_device_train_batch_size 32 --output_dir checkpoints/one > logs/t1.log 2>&1
run2 2 train.py $D --per_device_train_batch_size 16 --output_dir checkpoints/two > logs/t2.log 2>&1   # effective 32
for v in "" "$FAST"; do
  CUDA_VISIBLE_DEVICES=0 python analyze.py --checkpoint_dir checkpoints/one $A $v --output_dir scores/one > logs/a1.log 2>&1
  run2 2 analyze.py --checkpoint_dir checkpoints/one $A $v --use_ddp --output_dir scores/two > logs/a2.log 2>&1
done
t=$(date +%s.%N); CUDA_VISIBLE_DEVICES=0 run2 8 train.py $D $R --lds_output_dir lds/one > logs/r1.log 2>&1
r1=$(python3 -c "import time; print(round(time.time() - $t, 1))")
t=$(date +%s.%N); run2 16 train.py $D $R --lds_output_dir lds/two > logs/r2.log 2>&1     # 8 processes per GPU
r2=$(python3 -c "import time; print(round(time.time() - $t, 1))")
python - "$OUT" "$r1" "$r2" <<'PY'
import json, sys
from pathlib import Path
from analyze import load_scores
from benchmark import per_query_correlations
out, r1, r2 = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
m1, m2 = (json.loads(Path(f"checkpoints/{n}/metrics.json").read_text()) for n in ("one", "two"))
result = {"gpus": 2, "command": "bash results/ddp_h200x2.sh MODEL DATA OUT",
          "train_seconds_1_vs_2": [m1["train_seconds"], m2["train_seconds"]],
          "train_speedup": m1["train_seconds"] / m2["train_seconds"],
          "train_validation_accuracy_1_vs_2": [m1["validation_accuracy"], m2["validation_accuracy"]],
          "retrain_32_runs_seconds_1_vs_2": [r1, r2], "retrain_speedup": r1 / r2}
for one in sorted(Path("scores/one/one").glob("scores_*")):
    two = Path("scores/two/one") / one.name
    (a, ma), (b, mb) = load_scores(one), load_scores(two)
    t1, t2 = (sum(m["seconds"].values()) for m in (ma, mb))
    key = "fused" if one.name.endswith("_fused") else "kronfluence_fp32"
    result[key] = {"seconds_1_vs_2": [t1, t2], "speedup": t1 / t2, "vs_single_gpu": per_query_correlations(b, a)}
result["analyze_speedup"] = result["kronfluence_fp32"]["speedup"]
result["score_pearson_vs_single_gpu"] = result["kronfluence_fp32"]["vs_single_gpu"]["pearson"]
(out / "ddp_h200x2.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY

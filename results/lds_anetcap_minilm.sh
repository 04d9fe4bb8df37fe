#!/usr/bin/env bash
# The LDS table: MiniLM fine-tuned on the first 4,000 anetcap train rows, the first 500 validation rows as
# queries, 100 half-data retraining runs as ground truth, LDS of six score variants.
# Usage: bash results/lds_anetcap_minilm.sh MODEL_DIR DATA_DIR [NUM_PROCS]   (one GPU; resumable)
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; PROCS=${3:-8}
source results/anetcap_minilm_common.sh
t0=$(date +%s)
[ -f checkpoints/anetcap/model.safetensors ] || python train.py $D --output_dir checkpoints/anetcap > logs/train.log 2>&1
t1=$(date +%s)
# several retraining runs share the GPU: torchrun starts PROCS processes, each takes every PROCS-th run
torchrun --standalone --nproc-per-node="$PROCS" retrain.py $D --lds_num_masks 100 --lds_output_dir lds/anetcap > logs/lds.log 2>&1
t2=$(date +%s)
[ -f logs/timing.json ] || echo "{\"train_seconds\": $((t1 - t0)), \"lds_seconds\": $((t2 - t1)), \"lds_processes\": $PROCS}" > logs/timing.json
A="--checkpoint_dir checkpoints/anetcap $FACTOR_BATCHES --query_batch_size 500"
for variant in "identity" "diagonal" "kfac" "ekfac" "ekfac --use_half_precision" "ekfac --query_gradient_rank 32 --query_batch_size 50"; do
  s=$(date +%s)
  dir=$(analyze $A --factor_strategy $variant)
  python evaluate_lds.py --scores "$dir" --lds_dir lds/anetcap > "$dir/evaluate.log" 2>&1
  grep "^LDS" "$dir/evaluate.log"
  echo "{\"variant\": \"$variant\", \"seconds\": $(( $(date +%s) - s ))}" > "$dir/timing.json"
done

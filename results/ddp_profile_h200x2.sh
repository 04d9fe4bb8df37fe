#!/usr/bin/env bash
# The host-time profile of MiniLM training (tables in results/ddp_profile_h200x2/): 2,000 rows, batch 32 per GPU,
# 2 epochs, the whole run under torch.profiler (results/profile_run.py), on 1 GPU and on 2.
# Usage: bash results/ddp_profile_h200x2.sh MINILM_DIR ANETCAP_DIR OUT_DIR
set -u
MODEL=${1:?}; DATA=${2:?}; OUT=${3:?}
source results/anetcap_minilm_common.sh
ML="$MINILM --max_train_samples 2000 --num_queries 100 --per_device_train_batch_size 32 --num_train_epochs 2
    --dataloader_num_workers 2"
PROFILE_OUT=$OUT/one CUDA_VISIBLE_DEVICES=0 timeout 100 python results/profile_run.py train $ML --output_dir ck/p1 \
  > $OUT/one.log 2>&1; echo "one rc $?"
PROFILE_OUT=$OUT/two timeout 100 torchrun --standalone --nproc-per-node=2 results/profile_run.py train $ML \
  --output_dir ck/p2 > $OUT/two.log 2>&1; echo "two rc $?"

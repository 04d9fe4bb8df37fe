#!/usr/bin/env bash
# Issue 5: where the DDP training step's extra time goes. MiniLM, 2,000 rows, batch 32 per GPU, 2 epochs,
# whole run under torch.profiler (results/profile_run.py), on 1 GPU and on 2.
# Usage: bash results/ddp_profile_h200x2.sh MINILM_DIR ANETCAP_DIR OUT_DIR
set -u
MINILM=${1:?}; DATA=${2:?}; OUT=${3:?}
ROWS=2000 QUERIES=100
source results/minilm_2gpu_common.sh
PROFILE_OUT=$OUT/one CUDA_VISIBLE_DEVICES=0 timeout 100 python results/profile_run.py train $ML --output_dir ck/p1 \
  > $OUT/one.log 2>&1; echo "one rc $?"
PROFILE_OUT=$OUT/two timeout 100 torchrun --standalone --nproc-per-node=2 results/profile_run.py train $ML \
  --output_dir ck/p2 > $OUT/two.log 2>&1; echo "two rc $?"

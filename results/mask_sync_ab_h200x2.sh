#!/usr/bin/env bash
# Issues 4 and 5: does transformers' per-forward `padding_mask.all()` (a host-GPU sync every step) explain the
# host-bound training steps and the DDP step overhead? The same runs with and without it
# (results/run_variant.py --mask_sync off; run once in session 4, 2026-11-30, as results/without_mask_sync.py,
# since merged into run_variant.py; cuDNN attention was then on, as here). MiniLM, 8,000 rows, batch 32,
# 2 epochs, on 1 GPU and on 2 (DDP); and
# benchmark.py's training variants (roberta-base architecture, batch 16).
# Usage: bash results/mask_sync_ab_h200x2.sh MINILM_DIR ANETCAP_DIR ROBERTA_TOKENIZER_DIR OUT_DIR
set -u
MINILM=${1:?}; DATA=${2:?}; TOK=${3:?}; OUT=${4:?}
source results/minilm_2gpu_common.sh
P="results/run_variant.py --mask_sync off --cudnn_attention on"
r() { local name=$1; shift; timeout 120 "$@" --output_dir ck/$name > $OUT/$name.log 2>&1; echo "$name rc $?"; }
r ml_1x32_patched env CUDA_VISIBLE_DEVICES=0 python $P train $ML
r ml_2x32_patched torchrun --standalone --nproc-per-node=2 $P train $ML
CUDA_VISIBLE_DEVICES=0 timeout 150 python $P benchmark --tokenizer_dir "$TOK" --train_file "$DATA/train.csv.gz" \
  --validation_file "$DATA/validation.csv.gz" --configs --train_variants eager cudagraphs --train_steps 100 \
  --output "$OUT/benchmark_training_patched_h200.json" > $OUT/bench_patched.log 2>&1; echo "bench rc $?"
grep -h "__main__: epoch" $OUT/ml_*.log | cut -c1-160
python3 -c "import json; d=json.load(open('$OUT/benchmark_training_patched_h200.json'))['training']; print({k: (v['seconds_per_step'], v['retrain_50pct_swag_seconds']) for k, v in d.items()})"

#!/usr/bin/env bash
# The fused scores with their contraction in fp8 (--fp8_contraction: e4m3 rows, each with its own scale, as on a GPU,
# torch emulating _scaled_mm) against the same scores in float32, end to end on a CPU: MiniLM fine-tuned here on the
# first 256 anetcap training rows (1 epoch, batch 16), 50 queries, kronfluence's fp32 EKFAC factors shared by both
# analyses -> OUT_DIR/fp8_contraction_cpu.json (per-query Pearson and Spearman, relative error of the score matrix).
# Usage: bash results/fp8_contraction_cpu.sh MODEL_DIR DATA_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
WORK=${WORK:-/tmp/fp8_contraction_cpu}; mkdir -p "$OUT" "$WORK"
[ -f "$WORK/model/model.safetensors" ] || python train.py --model_name_or_path "$MODEL" \
  --train_file "$DATA/train.csv.gz" --validation_file "$DATA/validation.csv.gz" --max_train_samples 256 \
  --num_queries 50 --num_train_epochs 1 --per_device_train_batch_size 16 --output_dir "$WORK/model" > "$WORK/train.log" 2>&1
t=$(date +%s)
python analyze.py --checkpoint_dir "$WORK/model" --scoring fused --output_dir "$WORK/scores" > "$WORK/fp32.log" 2>&1
python analyze.py --checkpoint_dir "$WORK/model" --scoring fused --fp8_contraction --output_dir "$WORK/scores" \
  > "$WORK/fp8.log" 2>&1
python - "$WORK" "$OUT" "$(( $(date +%s) - t ))" <<'PY'
import json, os, platform, sys, time
from pathlib import Path
import torch
from formats import load_scores
from influence import library_versions
from metrics import per_query_correlations
work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
base = work / "scores" / "model"
(fp32, _), (fp8, _) = (load_scores(base / f"scores_ekfac_n256_q50_fused{s}") for s in ("", "_fp8"))
record = {"command": "bash results/fp8_contraction_cpu.sh MODEL DATA OUT",
          "setup": "MiniLM (all-MiniLM-L6-v2) fine-tuned on the first 256 anetcap training rows (1 epoch, batch 16); "
                   "50 queries x 256 training rows; kronfluence's fp32 EKFAC factors",
          "hardware": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
          "versions": library_versions(), "date": time.strftime("%Y-%m-%d"), "seconds": seconds,
          "fp8_vs_float32": {**per_query_correlations(fp8, fp32),
                             "relative_error": float((fp8 - fp32).norm() / fp32.norm())}}
(out / "fp8_contraction_cpu.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps(record["fp8_vs_float32"]))
PY

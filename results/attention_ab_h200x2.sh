#!/usr/bin/env bash
# Issues 4 and 5, for the next GPU session (NOT RUN YET; two calls of about 4 minutes on nvidia-h200-x2,
# back to back so that both land on the same machine: MODE on, then MODE off): does turning cuDNN
# attention off (pipeline.disable_cudnn_attention, the scripts' default since session 4) remove the first-epoch
# set-up and the DDP lockstep stalls? The same runs with it on (results/run_variant.py --cudnn_attention on,
# the old default) and off, on one machine: MiniLM, 8,000 rows, batch 32 per GPU, 2 epochs, on 1 GPU and on 2;
# and benchmark.py's training variants (roberta-base architecture, batch 16). Epoch times are in each run's
# log and metrics.json; the benchmark writes OUT/benchmark_training_cudnn_{on,off}_h200.json.
# Each mode compiles into its own inductor cache, so neither warms the other's CUDA-graph compile.
# Usage: bash results/attention_ab_h200x2.sh MINILM_DIR ANETCAP_DIR ROBERTA_TOKENIZER_DIR OUT_DIR {on|off}
set -u
MINILM=${1:?}; DATA=${2:?}; TOK=${3:?}; OUT=${4:?}; MODE=${5:?on or off}
source results/minilm_2gpu_common.sh
for cudnn in $MODE; do
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cudnn_$cudnn
  P="results/run_variant.py --cudnn_attention $cudnn"
  CUDA_VISIBLE_DEVICES=0 timeout 110 python $P train $ML --output_dir ck/ml_1x32_$cudnn > $OUT/ml_1x32_$cudnn.log 2>&1
  echo "ml_1x32 cudnn $cudnn rc $?"
  timeout 110 torchrun --standalone --nproc-per-node=2 $P train $ML --output_dir ck/ml_2x32_$cudnn \
    > $OUT/ml_2x32_$cudnn.log 2>&1
  echo "ml_2x32 cudnn $cudnn rc $?"
  CUDA_VISIBLE_DEVICES=0 timeout 160 python $P benchmark --tokenizer_dir "$TOK" --train_file "$DATA/train.csv.gz" \
    --validation_file "$DATA/validation.csv.gz" --configs --train_variants eager cudagraphs --train_steps 100 \
    --output "$OUT/benchmark_training_cudnn_${cudnn}_h200.json" > $OUT/bench_cudnn_$cudnn.log 2>&1
  echo "benchmark cudnn $cudnn rc $?"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
result = {"command": "bash results/attention_ab_h200x2.sh MINILM DATA TOKENIZER OUT {on,off}"}
for cudnn in ("on", "off"):
    r = result[f"cudnn_attention_{cudnn}"] = {}
    for run in ("ml_1x32", "ml_2x32"):
        metrics = Path(f"ck/{run}_{cudnn}/metrics.json")
        r[run] = [h["epoch_seconds"] for h in json.loads(metrics.read_text())["history"]] if metrics.exists() else "failed"
    bench = out / f"benchmark_training_cudnn_{cudnn}_h200.json"
    if bench.exists():
        r["benchmark"] = {k: {"seconds_per_step": v["seconds_per_step"], "warmup_pass_seconds": v["warmup_pass_seconds"]}
                          for k, v in json.loads(bench.read_text())["training"].items()}
(out / "attention_ab_h200x2.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY

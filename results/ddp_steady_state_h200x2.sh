#!/usr/bin/env bash
# The two-epoch DDP training table, on one host with 2 GPUs: every run trains 2 epochs; epoch 1 holds the
# warm-up (CUDA graphs, per-length kernel set-up), epoch 2 is the steady state. roberta-base is the
# architecture with random weights (speed only; its accuracy is chance), MiniLM the pretrained model of the
# LDS tables. Writes OUT_DIR/ddp_training_steady_state.json.
# Usage: bash results/ddp_steady_state_h200x2.sh MINILM_DIR ANETCAP_DIR ROBERTA_TOKENIZER_DIR OUT_DIR
set -u
MODEL=${1:?MiniLM dir}; DATA=${2:?anetcap dir}; TOK=${3:?roberta-base tokenizer dir}; export OUT=${4:?output dir}
source results/anetcap_minilm_common.sh
rm -rf ck
random_roberta "$TOK"
F="--num_queries 200 --num_train_epochs 2 --dataloader_num_workers 2"
RB="--model_name_or_path /tmp/rb $DATA_FLAGS $F --max_train_samples 4800"
ML="$MINILM $F --max_train_samples 8000 --per_device_train_batch_size 32"
r() { local name=$1; shift; "$@" --output_dir ck/$name > $OUT/$name.log 2>&1; echo "$name rc $?"; }
one() { CUDA_VISIBLE_DEVICES=0 timeout 150 "$@"; }
t2() { timeout 150 torchrun --standalone --nproc-per-node=2 "$@"; }
r rb_1x16 one python train.py $RB --per_device_train_batch_size 16
r rb_2x16 t2 train.py $RB --per_device_train_batch_size 16
r rb_2x8 t2 train.py $RB --per_device_train_batch_size 8
r rb_1x16_cg one python train.py $RB --per_device_train_batch_size 16 --torch_compile cudagraphs
r rb_2x16_cg t2 train.py $RB --per_device_train_batch_size 16 --torch_compile cudagraphs
r ml_1x32 one python train.py $ML
r ml_2x32 t2 train.py $ML
python - <<'PY'
import json, os
from pathlib import Path
out = {}
for d in sorted(Path("ck").iterdir()):
    if not (d / "metrics.json").is_file():
        out[d.name] = "failed: see its log"
        continue
    m = json.loads((d / "metrics.json").read_text())
    out[d.name] = {"epoch_seconds": [h["epoch_seconds"] for h in m["history"]], "train_seconds": m["train_seconds"],
                   "effective_batch_size": m["effective_batch_size"], "num_processes": m["num_processes"],
                   "validation_accuracy": m["validation_accuracy"]}
Path(os.environ["OUT"], "ddp_training_steady_state.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out))
PY

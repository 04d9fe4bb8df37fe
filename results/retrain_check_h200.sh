#!/usr/bin/env bash
# Two measurements on one H200 (529 s of device time):
# (1) where a training step's time goes, eager and with CUDA graphs (benchmark.py --profile: top GPU
#     operations and the GPU's busy time per pass) -> OUT_DIR/benchmark_training_profile_h200.json;
# (2) whether retraining with `--torch_compile cudagraphs` keeps the ground truth: 100 retraining runs of the
#     LDS setup trained with CUDA graphs (8 processes on the GPU), scored with the fast-path EKFAC scores of the
#     seed-1004 model, beside the eager runs in results/lds_anetcap_minilm_runs/ -> OUT_DIR/retrain_check_h200.json.
# Usage: bash results/retrain_check_h200.sh MODEL_DIR DATA_DIR ROBERTA_TOKENIZER_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; TOK=${3:?roberta-base tokenizer dir}; OUT=${4:?output dir}
source results/anetcap_minilm_common.sh
rm -rf lds/cudagraphs


python benchmark.py --tokenizer_dir "$TOK" --train_file "$DATA/train.csv.gz" --validation_file "$DATA/validation.csv.gz" \
  --configs --train_variants eager cudagraphs --train_steps 100 --profile \
  --output "$OUT/benchmark_training_profile_h200.json" > logs/bench_profile.log 2>&1
echo "training profile written"

python train.py $D --seed 1004 --output_dir checkpoints/s1004 > logs/train_s1004.log 2>&1
dir=$(analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $FAST)
t=$(date +%s.%N)
torchrun --standalone --nproc-per-node=8 retrain.py $D --lds_num_masks 100 --lds_repeats 1 --torch_compile cudagraphs \
  --lds_output_dir lds/cudagraphs > logs/retrain_cudagraphs.log 2>&1
wall=$(since $t)
echo "100 CUDA-graph retraining runs, 8 processes on one GPU: $wall s"
python evaluate_lds.py --scores "$dir" --lds_dir lds/cudagraphs --output_dir "$OUT/lds_cudagraphs" --no_plots \
  > logs/eval_cudagraphs.log 2>&1
python evaluate_lds.py --scores "$dir" --lds_dir $RUNS --output_dir "$OUT/lds_eager" --no_plots > logs/eval_eager.log 2>&1
grep -h "^LDS" logs/eval_cudagraphs.log logs/eval_eager.log

python - "$OUT" "$wall" "$dir" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open

import torch

out, wall, scores = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]).name

def runs(folder):
    meta = []
    for f in sorted(Path(folder).glob("run_*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            meta.append(handle.metadata())
    return {"count": len(meta), "mean_accuracy": sum(float(m["accuracy"]) for m in meta) / len(meta),
            "mean_run_seconds": sum(float(m["seconds"]) for m in meta) / len(meta)}

lds = {name: json.loads((out / f"lds_{name}/lds.json").read_text()) for name in ("cudagraphs", "eager")}
result = {"command": "bash results/retrain_check_h200.sh MODEL DATA TOKENIZER OUT", "gpu": torch.cuda.get_device_name(),
          "scores": scores, "cudagraph_retrains_wall_seconds": wall,
          "runs_cudagraphs": runs("lds/cudagraphs"), "runs_eager_committed": runs("results/lds_anetcap_minilm_runs"),
          "lds_cudagraph_runs": lds["cudagraphs"]["lds"], "lds_eager_runs": lds["eager"]["lds"],
          "lds_ci95": {"cudagraph_runs": lds["cudagraphs"]["ci95"], "eager_runs": lds["eager"]["ci95"]}}
(out / "retrain_check_h200.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY

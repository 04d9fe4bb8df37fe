#!/usr/bin/env bash
# Issue 5, for the next GPU session (NOT RUN YET; about 4 minutes on nvidia-h200-x2): the DDP step's lockstep
# stalls. Session 4's profile (results/ddp_profile_h200x2/) showed rank 1's host blocked 16.7 ms per collective
# call and the all-reduces on NCCL's low-latency protocol (ncclDevKernel_AllReduce_Sum_f32_RING_LL). MiniLM,
# 8,000 rows, 2 × 32, 2 epochs, one machine: the scripts' defaults; NCCL's Simple protocol; no per-forward
# buffer broadcast; and 1 × 32 as the reference. NCCL_DEBUG=INFO logs which protocol and transport it picks.
# Usage: bash results/ddp_ab_h200x2.sh MINILM_DIR ANETCAP_DIR OUT_DIR
set -u
MINILM=${1:?}; DATA=${2:?}; OUT=${3:?}
source results/minilm_2gpu_common.sh
T2="timeout 120 torchrun --standalone --nproc-per-node=2"
r() { local name=$1; shift; "$@" --output_dir ck/$name > $OUT/$name.log 2>&1; echo "$name rc $?"; }
r ml_1x32 env CUDA_VISIBLE_DEVICES=0 timeout 120 python train.py $ML
r ml_2x32 env NCCL_DEBUG=INFO $T2 train.py $ML
r ml_2x32_simple env NCCL_PROTO=Simple $T2 train.py $ML
r ml_2x32_no_buffer_broadcast $T2 results/run_variant.py --ddp_broadcast_buffers off train $ML
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
result = {"command": "bash results/ddp_ab_h200x2.sh MINILM DATA OUT"}
for run in ("ml_1x32", "ml_2x32", "ml_2x32_simple", "ml_2x32_no_buffer_broadcast"):
    metrics = Path(f"ck/{run}/metrics.json")
    result[run] = ({"epoch_seconds": [h["epoch_seconds"] for h in json.loads(metrics.read_text())["history"]]}
                   if metrics.exists() else "failed: see its log")
(Path(sys.argv[1]) / "ddp_ab_h200x2.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY

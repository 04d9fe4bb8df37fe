#!/usr/bin/env bash
# The two-GPU table, on one host with 2 GPUs, one stage per call (each under 10 minutes):
#   bash results/ddp_h200x2.sh train_analyze MODEL_DIR DATA_DIR OUT_DIR
#   bash results/ddp_h200x2.sh retrain       MODEL_DIR DATA_DIR OUT_DIR
#   bash results/ddp_h200x2.sh train         MODEL_DIR DATA_DIR OUT_DIR TOKENIZER_DIR   (the training half of
#        train_analyze, kept apart, its speedups taking precedence; plus the roberta-base architecture)
# MODEL_DIR: MiniLM (../shared/models/all-MiniLM-L6-v2-fp16); DATA_DIR: ../shared/data/anetcap;
# TOKENIZER_DIR: ../shared/tokenizers/roberta-base (the train stage builds a randomly initialised roberta-base:
#   the project's default model, timed with kronfluence's recipe, batch 16 per GPU; its accuracy is chance).
# train_analyze: fine-tuning on 8,000 rows on 1 GPU (batch 32) and on 2 (2 × 32, the usual DDP setting,
#   and 2 × 16, the same effective batch); analysis of the 1-GPU model (1,000 queries) with kronfluence fp32
#   EKFAC and with the fast path, each on 1 GPU and on 2 (--use_empirical_fisher, so that both fit the same
#   factors), plus the fast path with lambda on 25% of the rows, both scored against fp32.
# retrain: LDS_RUNS (default 160) retraining runs (2,000-row halves of 4,000 rows, 8 processes per GPU) on 1 GPU
#   and on 2, launched as LDS_LAUNCH says (torchrun, the default, or fork), after an untimed warm-up that fills
#   the tokenization cache for both; each process's start-up (launch to its first run) comes from the run files.
# Each stage adds its figures to results/ddp_h200x2.json and writes the result to OUT_DIR/ddp_h200x2.json.
set -euo pipefail
STAGE=${1:?stage}; MODEL=${2:?model dir}; DATA=${3:?anetcap dir}; OUT=${4:?output dir}; TOK=${5:-}
LDS_RUNS=${LDS_RUNS:-160}
LDS_LAUNCH=${LDS_LAUNCH:-torchrun}  # torchrun: 8 ranks per GPU; fork: one command forks 8 workers per GPU (--lds_processes)
source results/anetcap_minilm_common.sh
T="$MINILM --num_train_epochs 3 --max_train_samples 8000 --num_queries 1000 --dataloader_num_workers 2"
A="$FACTOR_BATCHES --query_batch_size 250 --use_empirical_fisher"
R="$D --lds_num_masks $LDS_RUNS --lds_repeats 1"
RB="--model_name_or_path /tmp/rb $DATA_FLAGS --max_train_samples 4800 --num_queries 1000 --dataloader_num_workers 2
    --per_device_train_batch_size 16"
: > logs/wall.txt
timed() {  # timed NAME COMMAND...: runs it with its log in logs/NAME.log; appends "NAME seconds start" to logs/wall.txt
  local name=$1 t; shift; t=$(date +%s.%N)
  "$@" > "logs/$name.log" 2>&1 || { tail -30 "logs/$name.log"; exit 1; }
  echo "$name $(since $t) $t" | tee -a logs/wall.txt
}
run2() { torchrun --standalone --nproc-per-node="$1" "${@:2}"; }
one() { CUDA_VISIBLE_DEVICES=0 "$@"; }

if [ "$STAGE" = train_analyze ] || [ "$STAGE" = train ]; then
  rm -rf checkpoints/one checkpoints/two_2x32 checkpoints/two_2x16 scores/one scores/two scores/lam  # time from scratch
  timed train_1x32 one python train.py $T --per_device_train_batch_size 32 --output_dir checkpoints/one
  timed train_2x32 run2 2 train.py $T --per_device_train_batch_size 32 --output_dir checkpoints/two_2x32
  timed train_2x16 run2 2 train.py $T --per_device_train_batch_size 16 --output_dir checkpoints/two_2x16
fi
if [ "$STAGE" = train ]; then
  rm -rf checkpoints/rb_one checkpoints/rb_two
  random_roberta "${TOK:?the train stage needs TOKENIZER_DIR}"
  timed train_rb_1x16 one python train.py $RB --output_dir checkpoints/rb_one
  timed train_rb_2x16 run2 2 train.py $RB --output_dir checkpoints/rb_two
elif [ "$STAGE" = train_analyze ]; then
  timed analyze_fp32_1 one python analyze.py --checkpoint_dir checkpoints/one $A --output_dir scores/one
  timed analyze_fp32_2 run2 2 analyze.py --checkpoint_dir checkpoints/one $A --use_ddp --output_dir scores/two
  timed analyze_fast_1 one python analyze.py --checkpoint_dir checkpoints/one $A $FAST --output_dir scores/one
  timed analyze_fast_2 run2 2 analyze.py --checkpoint_dir checkpoints/one $A $FAST --use_ddp --output_dir scores/two
  timed analyze_fast_lam25_1 one python analyze.py --checkpoint_dir checkpoints/one $A $FAST \
    --lambda_max_examples 2000 --output_dir scores/lam
elif [ "$STAGE" = retrain ]; then
  rm -rf lds/one lds/two  # finished runs would be skipped
  # warm-up, untimed: both timed commands find the tokenized data cached and the modules compiled
  python results/startup_probe.py "$OUT/startup_one_process.json" $R > logs/warmup.log 2>&1
  launch() {  # launch PROCESSES ARGS...: PROCESSES runs at once, as LDS_LAUNCH says
    local n=$1; shift
    if [ "$LDS_LAUNCH" = fork ]; then python retrain.py "$@" --lds_processes "$n"; else run2 "$n" retrain.py "$@"; fi
  }
  timed retrain_1gpu_8proc one launch 8 $R --lds_output_dir lds/one
  timed retrain_2gpu_16proc launch 16 $R --lds_output_dir lds/two
else
  echo "unknown stage $STAGE (train_analyze, train or retrain)"; exit 2
fi

LDS_LAUNCH=$LDS_LAUNCH python - "$STAGE" "$OUT" <<'PY'
import json, os, sys
from pathlib import Path

import torch
from safetensors import safe_open

from formats import load_scores
from metrics import per_query_correlations

stage, out = sys.argv[1], Path(sys.argv[2])
lines = [line.split() for line in Path("logs/wall.txt").read_text().splitlines()]
wall = {name: float(seconds) for name, seconds, _ in lines}
launched = {name: float(start) for name, _, start in lines}
path = Path("results/ddp_h200x2.json")
result = json.loads(path.read_text()) if path.exists() else {}
result = {k: v for k, v in result.items() if isinstance(v, dict)}  # every stage's figures; the summary is redone
s = result[stage] = {"wall_seconds": wall, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "command": f"bash results/ddp_h200x2.sh {stage} MODEL DATA OUT"}
if stage in ("train_analyze", "train"):
    for name in ("one", "two_2x32", "two_2x16", *(("rb_one", "rb_two") if stage == "train" else ())):
        m = json.loads(Path(f"checkpoints/{name}/metrics.json").read_text())
        s[f"train_{name}"] = {k: m[k] for k in ("train_seconds", "train_loop_seconds", "validation_accuracy",
                                                "num_processes", "effective_batch_size")}
        s[f"train_{name}"]["epoch_seconds"] = [h["epoch_seconds"] for h in m["history"]]
    t1 = s["train_one"]["train_seconds"]
    s["train_speedup_2x32"] = t1 / s["train_two_2x32"]["train_seconds"]
    s["train_speedup_2x16"] = t1 / s["train_two_2x16"]["train_seconds"]
    if stage == "train":
        s["train_speedup_roberta_base_2x16"] = s["train_rb_one"]["train_seconds"] / s["train_rb_two"]["train_seconds"]
if stage == "train_analyze":
    for one in sorted(Path("scores/one/one").glob("scores_*")):
        two = Path("scores/two/one") / one.name
        (a, ma), (b, mb) = load_scores(one), load_scores(two)
        t1, t2 = (sum(m["seconds"].values()) for m in (ma, mb))
        key, log = ("fast", "fast") if one.name.endswith("_fused") else ("kronfluence_fp32", "fp32")
        s[key] = {"scores": one.name, "stage_seconds_1_vs_2": [ma["seconds"], mb["seconds"]],
                  "speedup": t1 / t2, "wall_speedup": wall[f"analyze_{log}_1"] / wall[f"analyze_{log}_2"],
                  "vs_single_gpu": per_query_correlations(b, a)}
    fp32 = load_scores(next(Path("scores/one/one").glob("scores_*[0-9]")))[0]
    fast = load_scores(next(Path("scores/one/one").glob("scores_*_fused")))[0]
    lam = load_scores(next(Path("scores/lam/one").glob("scores_*_fused")))[0]
    s["issue4_fast_vs_fp32"] = per_query_correlations(fast, fp32)
    s["issue4_fast_lambda25_vs_fp32"] = per_query_correlations(lam, fp32)
elif stage == "retrain":
    for name, log in (("one", "retrain_1gpu_8proc"), ("two", "retrain_2gpu_16proc")):
        runs = sorted(Path(f"lds/{name}").glob("run_*.safetensors"))
        seconds, first_start = [], {}
        for r in runs:
            with safe_open(str(r), "pt") as f:
                meta = f.metadata()
            seconds.append(float(meta["seconds"]))
            first_start[meta["process"]] = min(first_start.get(meta["process"], float("inf")), float(meta["started"]))
        startup = [t - launched[log] for t in first_start.values()]
        s[f"runs_{name}"] = {"count": len(runs), "mean_run_seconds": sum(seconds) / len(seconds),
                             "startup_seconds_mean": sum(startup) / len(startup), "startup_seconds_min": min(startup),
                             "startup_seconds_max": max(startup)}
    s["launch"] = os.environ.get("LDS_LAUNCH", "torchrun")
    s["retrain_speedup"] = wall["retrain_1gpu_8proc"] / wall["retrain_2gpu_16proc"]
    # steady state: runs per second of run time, without the per-process start-up (imports, tokenizing);
    # both sides run 8 processes per GPU, so twice the processes at the 2-GPU run time
    s["retrain_steady_state_speedup"] = s["runs_one"]["mean_run_seconds"] / s["runs_two"]["mean_run_seconds"] * 2
ta, rt = result.get("train_analyze", {}), result.get("retrain", {})
tr = result.get("train", ta)  # the newest training figures
summary = {"gpus": "2x NVIDIA H200 (one host)", "train_speedup": tr.get("train_speedup_2x32"),
           "train_speedup_same_effective_batch": tr.get("train_speedup_2x16"),
           "train_speedup_roberta_base": tr.get("train_speedup_roberta_base_2x16"),
           "analyze_speedup": ta.get("kronfluence_fp32", {}).get("speedup"),
           "analyze_speedup_fast_path": ta.get("fast", {}).get("speedup"),
           "score_pearson_vs_single_gpu": ta.get("kronfluence_fp32", {}).get("vs_single_gpu", {}).get("pearson"),
           "retrain_speedup": rt.get("retrain_speedup"),
           "command": "bash results/ddp_h200x2.sh {train_analyze,train,retrain} MODEL DATA OUT"}
result = {**summary, **result}
(out / "ddp_h200x2.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY

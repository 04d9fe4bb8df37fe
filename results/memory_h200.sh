#!/usr/bin/env bash
# Memory budgets on one H200, as smaller cards: another process holds all but B GiB of the GPU, so that
# torch.cuda.mem_get_info in the measured process reports what a B GiB card would.
#   budgets: for each B, benchmark.py's fast configuration (`fast`, 2,048 rows x 1,000 queries) and
#            kronfluence's own bf16 scoring at its example's batch sizes (`reference_bf16`: factor batch 128,
#            query batch 100, training batch 128, padded to 128), default flags -> OUT/memory_<B>.json
#            (B = "full": no other process);
#   concurrent: the MiniLM LDS setup's fast-path EKFAC analysis alone, then two of them started at once on the
#            GPU with --max_memory_gb half of it each -> OUT/memory_concurrent.json;
#   merge: results/memory_h200.json from those files, with each stage's peak extrapolated to full SWAG scale.
# (SMOKE_FLAGS, if set, are appended to benchmark.py's flags: a CPU smoke test of the driver itself; BUDGET_CONFIGS,
# if set, replaces "fast reference_bf16".)
# Usage: bash results/memory_h200.sh budgets "22 38" MODEL_DIR DATA_DIR ROBERTA_TOKENIZER_DIR OUT_DIR
#        bash results/memory_h200.sh concurrent MODEL_DIR DATA_DIR OUT_DIR
#        bash results/memory_h200.sh merge results/memory_h200.json IN_DIR...
set -euo pipefail
what=${1:?budgets, concurrent or merge}; shift

hold_all_but() {  # hold_all_but B: a background process holds all but B GiB of GPU 0 until killed
  rm -f /tmp/hog.ready
  python - "$1" <<'PY' &
import sys, time
from pathlib import Path
import torch
free = torch.cuda.mem_get_info()[0]
held = torch.empty(int(free - float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
Path("/tmp/hog.ready").write_text(f"{held.numel() / 2**30:.2f}")
time.sleep(3600)
PY
  hog=$!
  while [ ! -f /tmp/hog.ready ]; do  # a holder that died (no torch, no GPU) stops the driver instead of a wait forever
    kill -0 "$hog" 2>/dev/null || { echo "the process holding GPU memory exited before holding it" >&2; exit 1; }
    sleep 0.5
  done
}

if [ "$what" = budgets ]; then
  budgets=${1:?budgets}; MODEL=${2:?model dir}; DATA=${3:?anetcap dir}; TOK=${4:?tokenizer dir}; OUT=${5:?output dir}
  source results/anetcap_minilm_common.sh
  for b in $budgets; do
    hog=
    [ "$b" = full ] || hold_all_but "$b"
    status=completed
    python benchmark.py --tokenizer_dir "$TOK" $DATA_FLAGS --num_train 2048 --num_queries 100 --num_fast_queries 1000 \
      --configs ${BUDGET_CONFIGS:-fast reference_bf16} --train_variants eager --train_steps 30 --output "$OUT/memory_$b.json" \
      --work_dir "/tmp/work_$b" ${SMOKE_FLAGS:-} > "logs/memory_$b.log" 2>&1 || status=failed
    [ -z "$hog" ] || { kill "$hog"; wait "$hog" 2>/dev/null || true; }
    echo "budget $b GiB: $status"; grep -h "WARNING\|rror\|: .* s, peak" "logs/memory_$b.log" | cut -c1-220 || true
    python -c "import json, sys; p = sys.argv[1]; d = json.load(open(p)); d['budget_gib'] = sys.argv[2]
d['completed'] = sys.argv[3] == 'completed'; d['date'] = sys.argv[4]; d['configs_requested'] = sys.argv[5].split()
json.dump(d, open(p, 'w'), indent=1)" "$OUT/memory_$b.json" "$b" "$status" "$(date -u +%F)" \
      "${BUDGET_CONFIGS:-fast reference_bf16}" \
      2>/dev/null || echo "{\"budget_gib\": \"$b\", \"completed\": false}" > "$OUT/memory_$b.json"
  done
elif [ "$what" = concurrent ]; then
  MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
  source results/anetcap_minilm_common.sh
  python train.py $D --seed 0 --output_dir checkpoints/memory > logs/train_memory.log 2>&1
  flags="--checkpoint_dir checkpoints/memory $A --factor_strategy ekfac $FAST"
  t=$(date +%s.%N); alone=$(analyze $flags --output_dir scores/alone); alone_s=$(since $t)
  half=$(python -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30 / 2))")
  t=$(date +%s.%N)
  analyze $flags --max_memory_gb "$half" --output_dir scores/first > /tmp/first.txt &
  analyze $flags --max_memory_gb "$half" --output_dir scores/second > /tmp/second.txt &
  wait; both_s=$(since $t)
  python - "$OUT" "$alone" "$(cat /tmp/first.txt)" "$(cat /tmp/second.txt)" "$alone_s" "$both_s" "$half" <<'PY'
import json, sys
from pathlib import Path
import torch
from formats import METADATA_FILE, load_scores
out, alone, first, second = Path(sys.argv[1]), *sys.argv[2:5]
runs = {"alone": alone, "first": first, "second": second}
scores = {k: load_scores(Path(v))[0] for k, v in runs.items() if v and Path(v).is_dir()}
meta = {k: json.loads((Path(v) / METADATA_FILE).read_text()) for k, v in runs.items() if k in scores}
result = {"command": "bash results/memory_h200.sh concurrent MODEL DATA OUT", "gpu": torch.cuda.get_device_name(),
          "max_memory_gb_each": float(sys.argv[7]), "alone_wall_seconds": float(sys.argv[5]),
          "both_wall_seconds": float(sys.argv[6]), "completed": {k: k in scores for k in runs},
          "runs": {k: {f: meta[k][f] for f in ("seconds", "fitted_in_memory", "peak_gpu_memory_gib")} for k in meta},
          "same_bits_as_alone": {k: torch.equal(scores[k], scores["alone"]) for k in scores if k != "alone"},
          "max_abs_difference_from_alone": {k: (scores[k] - scores["alone"]).abs().max().item()
                                            for k in scores if k != "alone"}}
(out / "memory_concurrent.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY
elif [ "$what" = merge ]; then
  output=${1:?output json}; shift
  python - "$output" "$@" <<'PY'
import json, sys
from pathlib import Path
from pipeline import REFERENCE_NUM_QUERIES, REFERENCE_NUM_TRAIN
from utils import write_json
files = [f for d in sys.argv[2:] for f in sorted(Path(d).glob("memory_*.json"))]
budgets, concurrent = {}, None
for f in files:
    d = json.loads(f.read_text())
    if f.name == "memory_concurrent.json":
        concurrent = d
        continue
    configs = {}
    for name, c in d.get("configs", {}).items():
        stages = {s: {k: v[k] for k in ("seconds", "peak_gib", "fitted_in_memory") if k in v}
                  for s, v in c.items() if isinstance(v, dict) and "peak_gib" in v}
        # full scale: the factor stages' memory is per batch; the scores matrix grows with the rows (fused: all of
        # it on the GPU, float32; kronfluence: one query batch's rows at a time)
        rows = (REFERENCE_NUM_QUERIES * REFERENCE_NUM_TRAIN - c["settings"]["num_queries_timed"]
                * d["subset"]["num_train"]) if c["settings"]["scoring"] == "fused" else \
            stages["scores"]["fitted_in_memory"]["query_batch_size"] * (REFERENCE_NUM_TRAIN - d["subset"]["num_train"])
        stages["scores"]["full_scale_peak_gib"] = round(stages["scores"]["peak_gib"] + rows * 4 / 2**30, 2)
        configs[name] = {"stages": stages, "fused_plan": c.get("fused"),
                         "full_scale_seconds": c["full_scale_seconds"]}
    requested = set(d.get("configs_requested", ["fast", "reference_bf16"]))
    budgets[d["budget_gib"]] = {"completed": d["completed"] and set(configs) == requested,
                                "gpu_memory_free_gib_at_start": d.get("gpu_memory_free_gib_at_start"),
                                "configs": configs, "command": d.get("command")}
first = json.loads(files[0].read_text())
write_json(Path(sys.argv[1]), {
    "driver": "bash results/memory_h200.sh budgets|concurrent|merge", "gpu": first.get("gpu"), "date": first.get("date"),
    "versions": {k: first.get(k) for k in ("torch", "transformers", "kronfluence")},
    "subset": first.get("subset"), "full_scale": first.get("full_scale"),
    "full_scale_peak_scaling": "factor stages: per batch, as measured; scores: + the float32 score rows held on "
                               "the GPU (fused: 2,000 x 73,536; kronfluence: one query batch x 73,536)",
    "budgets": budgets, "concurrent": concurrent})
print(Path(sys.argv[1]).read_text())
PY
fi

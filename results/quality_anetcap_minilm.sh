#!/usr/bin/env bash
# The fast-path quality and seed-ensemble tables, on one H200: the LDS setup (MiniLM, 4,000 anetcap rows,
# 500 queries) scored against its 100 ground-truth runs in results/lds_anetcap_minilm_runs/. (1) The seed-1004
# model alone: kronfluence's fp32 and all-bf16 EKFAC and the fast path (EKFAC, EKFAC with lambda on 1,000 rows,
# KFAC), each analysis timed alone, plus the fast path's score agreement with fp32 EKFAC; (2) seeds 1005-1011,
# and ensembles K = 1, 2, 4, 8 of fast EKFAC and fast KFAC scores (per-query standardised, and the plain mean).
# Usage: bash results/quality_anetcap_minilm.sh MODEL_DIR DATA_DIR OUT_DIR   (finished analyses are reused)
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}
source results/anetcap_minilm_common.sh

# (1) seed 1004 alone: standalone cost of one model, then the reference and the fast path on it
t=$(date +%s.%N); python train.py $D --seed 1004 --output_dir checkpoints/s1004 > logs/train_s1004.log 2>&1
echo "train seed 1004 alone: $(since $t) s"
for v in "ekfac" "ekfac $FAST" "ekfac $FAST --lambda_max_examples 1000" "kfac $FAST" "ekfac --use_half_precision"; do
  t=$(date +%s.%N); dir=$(analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy $v)
  echo "analyze [$v] alone: $(since $t) s -> $dir"; lds "$dir"
done
# (2) seven more seeds, trained and analysed 4 at a time
t=$(date +%s.%N)
for s in 1005 1006 1007 1008 1009 1010 1011; do python train.py $D --seed $s --output_dir checkpoints/s$s > logs/train_s$s.log 2>&1 & done; wait
echo "train 7 seeds at once: $(since $t) s"; t=$(date +%s.%N)
for strategy in ekfac kfac; do
  for s in 1005 1006 1007 1008 1009 1010 1011; do analyze --checkpoint_dir checkpoints/s$s $A --factor_strategy $strategy $FAST > logs/an_${strategy}_$s.txt & 
    [ $(jobs -r | wc -l) -ge 4 ] && wait -n; done; wait
done
echo "analyze 7 seeds x (ekfac, kfac), 4 at a time: $(since $t) s"
for strategy in ekfac kfac; do
  name=scores_${strategy}_n4000_bf16acc32_q500_fused
  for k in 1 2 4 8; do
    dirs=$(for s in $(seq 1004 $((1003 + k))); do echo scores/s$s/$name; done)
    dir=$(analyze --combine $dirs)
    echo "ensemble $strategy K=$k -> $dir"; lds "$dir"
  done
  dir=$(analyze --combine $(for s in $(seq 1004 1011); do echo scores/s$s/$name; done) --combine_mode mean)
  echo "ensemble $strategy K=8 mean -> $dir"; lds "$dir"
done
python - "$OUT" <<'PY'
import json, sys, glob
from pathlib import Path
from formats import load_scores
from metrics import per_query_correlations
ref = load_scores(Path("scores/s1004/scores_ekfac_n4000_q500"))[0]
out = {"lds": {}, "agreement_vs_kronfluence_fp32_ekfac": {}}
for f in sorted(glob.glob("scores/**/lds.json", recursive=True)):
    d = json.load(open(f)); out["lds"][f.split("/")[-2]] = {k: d[k] for k in ("lds", "ci95") if k in d}
for name in ("scores_ekfac_n4000_bf16acc32_q500_fused", "scores_ekfac_n4000_bf16acc32_lam1000_q500_fused",
             "scores_ekfac_n4000_bf16_q500"):
    out["agreement_vs_kronfluence_fp32_ekfac"][name] = per_query_correlations(load_scores(Path(f"scores/s1004/{name}"))[0], ref)
json.dump(out, open(sys.argv[1] + "/quality.json", "w"), indent=1)
print(json.dumps(out["agreement_vs_kronfluence_fp32_ekfac"], indent=1))
PY

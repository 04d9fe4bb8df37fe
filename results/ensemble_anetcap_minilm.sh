#!/usr/bin/env bash
# The ensemble table's fast-EKFAC rows, compact: K seeds of MiniLM on the LDS setup, trained and analysed (fast
# EKFAC) all at once on one H200, kronfluence's fp32 EKFAC on the first seed beside them, then ensembles of the
# first 1, 2, 4, ... seeds evaluated against the 100 ground-truth runs in results/lds_anetcap_minilm_runs/.
# Usage: bash results/ensemble_anetcap_minilm.sh MODEL_DIR DATA_DIR OUT_DIR [K]
set -euo pipefail
MODEL=${1:?model dir}; DATA=${2:?anetcap dir}; OUT=${3:?output dir}; K=${4:-4}
source results/anetcap_minilm_common.sh
SEEDS=$(seq 1004 $((1003 + K)))
t=$(date +%s.%N)
for s in $SEEDS; do python train.py $D --seed $s --output_dir checkpoints/s$s > logs/train_s$s.log 2>&1 & done; wait
echo "train $K seeds at once: $(since $t) s"; t=$(date +%s.%N)
analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac > logs/ref.txt &
for s in $SEEDS; do analyze --checkpoint_dir checkpoints/s$s $A --factor_strategy ekfac $FAST > logs/an_$s.txt & done; wait
echo "analyze $K seeds (fast ekfac) + 1 fp32 reference at once: $(since $t) s"
name=scores_ekfac_n4000_bf16acc32_q500_fused
k=1; while [ $k -le $K ]; do
  dir=$(analyze --combine $(for s in $(seq 1004 $((1003 + k))); do echo scores/s$s/$name; done))
  echo "ensemble K=$k -> $dir"; lds "$dir" & k=$((k * 2)); done; wait
python - "$OUT" <<'PY'
import glob, json, sys
from pathlib import Path
from formats import load_scores
from metrics import per_query_correlations
out = {"lds": {f.split("/")[-2]: {k: v for k, v in json.load(open(f)).items() if k in ("lds", "ci95")}
               for f in sorted(glob.glob("scores/**/lds.json", recursive=True))}}
try:
    out["fast_vs_kronfluence_fp32_seed1004"] = per_query_correlations(
        load_scores(Path("scores/s1004/scores_ekfac_n4000_bf16acc32_q500_fused"))[0],
        load_scores(Path("scores/s1004/scores_ekfac_n4000_q500"))[0])
except SystemExit as exc:
    out["fast_vs_kronfluence_fp32_seed1004"] = str(exc)
json.dump(out, open(sys.argv[1] + "/ensemble.json", "w"), indent=1)
print(json.dumps(out, indent=1))
PY

#!/usr/bin/env bash
# The ground truth's noise ceiling and the removal test on the MiniLM LDS setup (one GPU; resumable):
#   ceiling: the 100 half-data masks x REPEATS seeds (the committed runs in results/lds_anetcap_minilm_runs/ carry
#     an older settings hash, so they are not reused), then the LDS of fast EKFAC and identity against the
#     average, with the noise ceiling and a paired comparison -> OUT_DIR/lds_r<REPEATS>/lds.json, run files
#     -> OUT_DIR/runs.tar;
#   removal: the removal test for the first NUM_QUERIES queries, 5% of the rows, fast EKFAC against random rows
#     -> OUT_DIR/removal_ekfac/removal.json.
# Usage: bash results/ceiling_removal_anetcap_minilm.sh ceiling MODEL_DIR DATA_DIR OUT_DIR [REPEATS] [NUM_PROCS]
#        bash results/ceiling_removal_anetcap_minilm.sh removal MODEL_DIR DATA_DIR OUT_DIR [NUM_QUERIES] [NUM_PROCS]
set -euo pipefail
PART=${1:?ceiling or removal}; MODEL=${2:?model dir}; DATA=${3:?anetcap dir}; OUT=${4:?output dir}; N=${5:-2}
PROCS=${6:-8}
source results/anetcap_minilm_common.sh
[ -f checkpoints/s1004/model.safetensors ] || python train.py $D --output_dir checkpoints/s1004 > logs/train_s1004.log 2>&1
fast=$(analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy ekfac $FAST)
if [ "$PART" = ceiling ]; then
t=$(date +%s.%N)
torchrun --standalone --nproc-per-node="$PROCS" train.py $D --lds_num_masks 100 --lds_repeats "$N" \
  --lds_output_dir lds/anetcap_r$N > logs/lds_r$N.log 2>&1
echo "100 masks x $N repeats: $(since $t) s"
identity=$(analyze --checkpoint_dir checkpoints/s1004 $A --factor_strategy identity)
for scores in "$fast" "$identity"; do
  python evaluate_lds.py --scores "$scores" --lds_dir lds/anetcap_r$N --compare "$identity" --no_plots \
    --output_dir "$OUT/lds_r$N/$(basename "$scores")" > logs/eval.log 2>&1 && grep -h "LDS\|ceiling" logs/eval.log
done
tar -cf "$OUT/runs.tar" -C lds anetcap_r$N
else
t=$(date +%s.%N)
torchrun --standalone --nproc-per-node="$PROCS" train.py $D --removal_scores "$fast" --removal_num_queries "$N" \
  --removal_fraction 0.05 --removal_output_dir removal/anetcap > logs/removal.log 2>&1
echo "removal runs ($N queries): $(since $t) s"
python evaluate_lds.py --scores "$fast" --removal_dir removal/anetcap --output_dir "$OUT/removal_ekfac" \
  > logs/eval_removal.log 2>&1
grep -h "removing" logs/eval_removal.log
fi

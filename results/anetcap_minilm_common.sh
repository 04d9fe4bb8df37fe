# Shared by the issue-4/6 drivers (sourced, not run): the issue-3 setup's data and recipe flags, the fast
# path's flags, and small helpers. Expects MODEL, DATA and OUT to be set.
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
RUNS=results/lds_anetcap_minilm_runs
D="--model_name_or_path $MODEL --train_file $DATA/train.csv.gz --validation_file $DATA/validation.csv.gz
   --max_train_samples 4000 --num_queries 500 --learning_rate 5e-5 --per_device_train_batch_size 32 --num_train_epochs 3"
A="--factor_batch_size 128 --train_batch_size 256 --query_batch_size 100"
FAST="--use_half_precision --fp32_accumulation --scoring fused"
mkdir -p logs "$OUT"
since() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
analyze() { python -c "import sys, analyze; print(analyze.main(sys.argv[1:]))" "$@" 2>>logs/analyze.err | tail -1; }
lds() { python evaluate_lds.py --scores "$1" --lds_dir $RUNS --no_plots > "$1/evaluate.log" 2>&1 || true; grep "^LDS\|rror" "$1/evaluate.log" || true; }

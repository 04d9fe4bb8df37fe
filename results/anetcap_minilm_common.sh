# Sourced (not run) by the drivers in results/: the environment, the MiniLM-on-anetcap data and recipe flags,
# the fast path's flags and small helpers. Expects MODEL (the MiniLM directory) and DATA (the anetcap
# directory); OUT, where set, is created.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=2 \
       TOKENIZERS_PARALLELISM=false  # NVLink multicast off; two threads per process
RUNS=results/lds_anetcap_minilm_runs  # the 100 ground-truth runs of the one-seed LDS table
DATA_FLAGS="--train_file $DATA/train.csv.gz --validation_file $DATA/validation.csv.gz"
MINILM="--model_name_or_path $MODEL $DATA_FLAGS --learning_rate 5e-5"  # + rows, queries, batch, epochs
# the LDS setup: the first 4,000 training rows, the first 500 validation rows as queries, batch 32, 3 epochs
D="$MINILM --max_train_samples 4000 --num_queries 500 --per_device_train_batch_size 32 --num_train_epochs 3"
[ -z "${SETUP_FLAGS:-}" ] || D=$SETUP_FLAGS  # data and recipe flags in place of the MiniLM setup (the demo on a CPU)
FACTOR_BATCHES="--factor_batch_size 128 --train_batch_size 256"
A="$FACTOR_BATCHES --query_batch_size 100"
FAST="--fast"
gpu_share() { if command -v nvidia-smi > /dev/null 2>&1; then echo "--max_memory_gb $1"; fi; }  # GiB of a shared GPU
gpu_split() {  # gpu_split N: --max_memory_gb for one of N processes sharing this GPU (90% of its memory split N ways)
  if command -v nvidia-smi > /dev/null 2>&1; then
    echo "--max_memory_gb $(( $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1) * 9 / 10240 / $1 ))"
  fi
}
mkdir -p logs ${OUT:+"$OUT"}
since() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
analyze() { python -c "import sys, analyze, utils; utils.run_script(lambda: print(analyze.main(sys.argv[1:])))" "$@" \
  2>>logs/analyze.err | tail -1; }  # prints the scores directory
lds() { python evaluate_lds.py --scores "$1" --lds_dir $RUNS --no_plots > "$1/evaluate.log" 2>&1 || true; grep "^LDS\|rror" "$1/evaluate.log" || true; }
random_roberta() {  # random_roberta TOKENIZER_DIR: a randomly initialised roberta-base with that tokenizer, in /tmp/rb
  python -c "import sys; from pathlib import Path; from benchmark import load_tokenizer, random_roberta
tok = load_tokenizer(Path(sys.argv[1])); random_roberta(tok).save_pretrained('/tmp/rb'); tok.save_pretrained('/tmp/rb')" "$1"
}

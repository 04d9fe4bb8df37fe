# Shared by the 2-GPU diagnostic drivers (sourced, not run): NVLink multicast off, thread counts, and MiniLM's
# training flags (batch 32 per GPU, 2 epochs). Expects MINILM, DATA and OUT to be set; ROWS and QUERIES
# (default 8,000 and 200) size the run.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
ML="--model_name_or_path $MINILM --train_file $DATA/train.csv.gz --validation_file $DATA/validation.csv.gz
    --max_train_samples ${ROWS:-8000} --num_queries ${QUERIES:-200} --learning_rate 5e-5
    --per_device_train_batch_size 32 --num_train_epochs 2 --dataloader_num_workers 2"

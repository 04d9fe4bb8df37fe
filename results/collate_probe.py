"""A diagnostic: the host work of `train.py`'s loader per batch: fetching the tokenized rows (one
`Dataset.__getitems__` call, as torch's DataLoader does) and padding them with transformers'
DataCollatorForMultipleChoice.

    python results/collate_probe.py OUT.json --model_name_or_path ../shared/models/all-MiniLM-L6-v2-fp16 \\
        --train_file ../shared/data/anetcap/train.csv.gz --validation_file ../shared/data/anetcap/validation.csv.gz \\
        --max_train_samples 8000 --num_queries 10 --per_device_train_batch_size 32

Every argument after OUT.json is train.py's. One process, one thread; medians over REPEATS (env, default 50)
random batches.
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from pipeline import load_raw, make_collator, prepare_data  # noqa: E402
from utils import write_json  # noqa: E402


def median_ms(step, batches) -> float:
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main():
    out, args = Path(sys.argv[1]), train.parse_args(sys.argv[2:])
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    data = prepare_data(args, tokenizer, load_raw(args))
    collator, size = make_collator(tokenizer, args.pad_to_max_length, args.max_length), args.per_device_train_batch_size
    repeats = int(os.environ.get("REPEATS", 50))
    rng = np.random.default_rng(args.seed)
    picks = [rng.choice(len(data.train), size, replace=False).tolist() for _ in range(repeats)]
    fetched = [data.train.__getitems__(pick) for pick in picks]
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")][:1]
    result = {"cpu": cpu[0] if cpu else platform.processor(), "python": platform.python_version(), "batch_rows": size,
              "sequences": size * 4, "repeats": repeats,
              "fetch_ms": median_ms(data.train.__getitems__, picks),
              "collate_ms": median_ms(collator, fetched),
              "padded_length_median": statistics.median(collator(rows)["input_ids"].shape[-1] for rows in fetched)}
    write_json(out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

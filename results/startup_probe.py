"""A diagnostic: where a retraining process's start-up goes (launch to its first run), phase by phase.

    LAUNCH=$(date +%s.%N) torchrun --standalone --nproc-per-node=16 results/startup_probe.py OUT.json \\
        --model_name_or_path MINILM --train_file DATA/train.csv.gz --validation_file DATA/validation.csv.gz \\
        --max_train_samples 4000 --num_queries 500 --lds_num_masks 1

Every argument after OUT.json is retrain.py's. Each process goes through the steps of `training.run_lds` up to its
first run, timing each one; LAUNCH (Unix time, set just before torchrun) gives the time before Python runs
this file. Rank 0 gathers every process's seconds into OUT.json (through the file system, no collectives).
"""

import time

T0 = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PHASES = {"python_start": T0 - float(os.environ.get("LAUNCH", T0))}


def phase(name, start):
    PHASES[name] = time.time() - start
    return time.time()


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    t = time.time()
    import torch
    t = phase("import_torch", t)
    import transformers  # noqa: F401
    t = phase("import_transformers", t)
    import datasets  # noqa: F401
    t = phase("import_datasets", t)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import retrain
    from pipeline import (
        load_pretrained,
        load_raw,
        make_collator,
        prepare_data,
        require_labels,
    )
    from utils import process_device, process_rank, write_json
    t = phase("import_project", t)
    args = retrain.parse_args(argv)
    device = process_device()
    torch.zeros(1, device=device)
    t = phase("cuda_context", t)
    raw = load_raw(args)
    t = phase("load_raw", t)
    model, tokenizer = load_pretrained(args.model_name_or_path, raw, seed=args.seed)
    {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = phase("load_model", t)
    data = prepare_data(args, tokenizer, raw)
    require_labels(data.queries)
    make_collator(tokenizer, args.pad_to_max_length, args.max_length)
    t = phase("tokenize", t)
    model.to(device)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    phase("model_to_device", t)
    PHASES["total"] = time.time() - float(os.environ.get("LAUNCH", T0))
    PHASES["kronfluence_imported"] = "kronfluence" in sys.modules  # train.py no longer imports it
    rank, world, _ = process_rank()
    write_json(out.with_name(f"{out.stem}.rank{rank}.json"), PHASES)  # atomic: whole, for rank 0 to read
    if rank == 0:  # wait for the others' files, then summarise
        files = [out.with_name(f"{out.stem}.rank{r}.json") for r in range(world)]
        while not all(f.exists() for f in files):
            time.sleep(0.2)
        ranks = [json.loads(f.read_text()) for f in files]
        seconds = [k for k, v in PHASES.items() if isinstance(v, float)]
        summary = {"processes": world, "mean": {k: round(sum(r[k] for r in ranks) / world, 2) for k in seconds},
                   "max": {k: round(max(r[k] for r in ranks), 2) for k in seconds},
                   "kronfluence_imported": PHASES["kronfluence_imported"], "ranks": ranks}
        write_json(out, summary)
        print(json.dumps(summary["mean"]))


if __name__ == "__main__":
    main()

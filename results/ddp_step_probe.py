"""A diagnostic: where the time of a 2-GPU DDP training step goes, in one launch (run on nvidia-h200-x2).

    torchrun --standalone --nproc-per-node=2 results/ddp_step_probe.py --probe_out OUT/ddp_step_probe.json \\
        --model_name_or_path MINILM --train_file DATA/train.csv.gz --validation_file DATA/validation.csv.gz \\
        --max_train_samples 8000 --num_queries 200 --learning_rate 5e-5 --per_device_train_batch_size 32

Every flag after --probe_out is train.py's. The probe measures, on one machine:
1. NCCL all-reduce time by message size;
2. the host-GPU syncs of a few training steps and the code that makes them (torch.cuda.set_sync_debug_mode);
3. the step time, and the host time spent in each phase of a step (batch copy, forward with loss, backward,
   optimizer), over this rank's half of the training batches (collated beforehand and pinned, so data loading
   is out of the picture), for these variants of train.py's step:
   - alone: no DDP, each rank training its own copy at the same time (the ceiling for DDP); also rank 0 only;
   - ddp: torch DDP as accelerate sets it up for train.py; then without the per-forward buffer broadcast,
     with static_graph and gradient_as_bucket_view, with a bf16 compression hook, with one 100 MB bucket;
   - mask_check: transformers' per-forward padding_mask.all() check back on (pipeline.configure_attention
     removes it), alone and under DDP;
   - cudnn: cuDNN attention back on, two passes (the first pays its per-shape plans).
Each variant starts from the same weights and runs two passes over the batches (the second continues from the
first's weights, with a fresh optimizer) and reports the second (the first holds DDP's bucket rebuild and any
per-shape set-up), except cudnn, which reports both.
"""

import argparse
import copy
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's scripts

import train  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from pipeline import (  # noqa: E402
    load_pretrained,
    load_raw,
    make_collator,
    model_logits,
    prepare_data,
)
from utils import configure_attention  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def all_reduce_times(device):
    out = {}
    for mb in (0.004, 1, 25, 90, 500):
        x = torch.ones(int(mb * 2**20) // 4, device=device)
        for _ in range(3):
            dist.all_reduce(x)
        sync()
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        sync()
        seconds = (time.perf_counter() - start) / 10
        out[f"{mb:g} MB"] = {"ms": round(seconds * 1e3, 3), "GB_per_s": round(x.numel() * 4 / seconds / 1e9, 1)}
    return out


def train_pass(net, model, batches, device, phases):
    """One pass of train.py's step over the batches; host seconds per phase are added to `phases`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.001, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_sum = torch.zeros((), device=device)
    sync()
    start = time.perf_counter()
    for cpu_batch in batches:
        t0 = time.perf_counter()
        batch = training.to_device(cpu_batch, device)
        t1 = time.perf_counter()
        with training.autocast(device):
            logits = model_logits(net, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        t4 = time.perf_counter()
        for name, seconds in (("copy", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3)):
            phases[name] = phases.get(name, 0.0) + seconds
    loss_sum.item()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe_out", type=Path, required=True, help="JSON file for the results (rank 0 writes).")
    probe, rest = parser.parse_known_args()
    args = train.parse_args(rest)
    cuda = torch.cuda.is_available()  # CPU (gloo) only to try the probe out
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local = utils.process_rank()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    configure_attention()
    result = {"rank": rank, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    result["all_reduce"] = all_reduce_times(device)

    raw = load_raw(args)
    template, tokenizer = load_pretrained(args.model_name_or_path, raw, seed=args.seed)
    data = prepare_data(args, tokenizer, raw)
    loader = DataLoader(data.train, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
                        collate_fn=make_collator(tokenizer), generator=torch.Generator().manual_seed(args.seed))
    batches = [{k: v.pin_memory() if cuda else v for k, v in b.items()} for b in loader][rank::world]
    result["steps_per_pass"] = len(batches)

    def fresh(ddp, mask_check=False, cudnn=False):
        """A copy of the initial model with these attention settings, wrapped in DDP when `ddp` gives its options."""
        configure_attention(cudnn=cudnn, mask_check=mask_check)
        model = copy.deepcopy(template).to(device).train()
        return model, (DDP(model, device_ids=[local] if cuda else None, **ddp) if ddp is not None else model)

    def variant(name, ddp=None, hook=None, mask_check=False, cudnn=False, ranks=(0, 1), passes=2, report=(1,)):
        model, net = fresh(ddp, mask_check, cudnn)
        if hook is not None:
            net.register_comm_hook(None, hook)
        dist.barrier()
        if rank in ranks:
            record = {}
            for i in range(passes):
                phases = {}
                seconds = train_pass(net, model, batches, device, phases)
                if i in report:
                    record[f"pass{i + 1}"] = {"seconds": round(seconds, 3),
                                              "ms_per_step": round(seconds / len(batches) * 1e3, 2),
                                              "host_ms_per_step": {k: round(v / len(batches) * 1e3, 2)
                                                                   for k, v in phases.items()}}
            result.setdefault("variants", {})[name] = record
            print(f"rank {rank} {name}: {record}", flush=True)
        del net, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        dist.barrier()

    def syncs(name, ddp=None, mask_check=False, steps=3):
        """Every synchronising CUDA call in `steps` training steps, by the Python stack that made it."""
        model, net = fresh(ddp, mask_check)
        stacks = {}

        def show(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-8:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            stacks[key] = stacks.get(key, 0) + 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            train_pass(net, model, batches[:steps], device, {})
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        result.setdefault("syncs", {})[name] = {"steps": steps, "stacks": stacks}
        del net, model
        dist.barrier()

    ddp = {"broadcast_buffers": True, "bucket_cap_mb": 25}  # DDP's (and accelerate's) defaults
    no_bcast = {**ddp, "broadcast_buffers": False}
    variant("warmup", passes=1, report=())  # every batch shape once, both ranks
    syncs("alone_mask_check", mask_check=True)
    syncs("alone")
    syncs("ddp", ddp=ddp)
    variant("alone")
    variant("alone_rank0_only", ranks=(0,))
    variant("alone_mask_check", mask_check=True)
    variant("ddp_mask_check", ddp=ddp, mask_check=True)
    variant("ddp", ddp=ddp)
    variant("ddp_no_broadcast", ddp=no_bcast)
    variant("ddp_no_broadcast_static_bucket_view", ddp={**no_bcast, "static_graph": True,
                                                        "gradient_as_bucket_view": True})
    variant("ddp_no_broadcast_bf16_hook", ddp=no_bcast, hook=default_hooks.bf16_compress_hook)
    variant("ddp_no_broadcast_bucket100", ddp={**no_bcast, "bucket_cap_mb": 100})
    variant("alone_cudnn", cudnn=True, report=(0, 1))

    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        probe.probe_out.parent.mkdir(parents=True, exist_ok=True)
        probe.probe_out.write_text(json.dumps({"command": "torchrun --standalone --nproc-per-node=2 "
                                               "results/ddp_step_probe.py --probe_out OUT ARGS",
                                               "args": rest, "ranks": gathered}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run a project script with one of its speed-relevant defaults switched (a diagnostic for A/B timing runs).

    python results/run_variant.py --mask_sync on train ARGS...           # = python train.py ARGS..., patched
    python results/run_variant.py --cudnn_attention on benchmark ARGS...
    torchrun --standalone --nproc-per-node=2 results/run_variant.py --ddp_broadcast_buffers off train ARGS...

--mask_sync on / --cudnn_attention on: undo one half of pipeline.configure_attention, which every script
calls, to time the old default: transformers' per-forward `padding_mask.all()` check (a host-GPU sync in every
step), or cuDNN among PyTorch's attention kernels (a plan per new padded shape).

--ddp_broadcast_buffers off: DDP (through accelerate) stops broadcasting the model's buffers from rank 0
before every forward, one collective less per step. Safe for these models: their buffers (position and
token-type ids) never change.
"""

import argparse
import functools
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's scripts

import pipeline  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask_sync", choices=["on", "off"], default="off",
                        help="transformers' per-forward padding-mask check (the scripts' default: off).")
    parser.add_argument("--cudnn_attention", choices=["on", "off"], default="off",
                        help="cuDNN attention kernels (the scripts' default: off).")
    parser.add_argument("--ddp_broadcast_buffers", choices=["on", "off"], default="on",
                        help="DDP's per-forward buffer broadcast (train.py under torchrun).")
    parser.add_argument("script", choices=["train", "analyze", "benchmark"], help="The project script to run.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Its arguments.")
    args = parser.parse_args()
    if args.ddp_broadcast_buffers == "off":
        import accelerate

        make_accelerator = accelerate.Accelerator.__init__

        def without_buffer_broadcast(self, *a, **kwargs):
            handler = accelerate.DistributedDataParallelKwargs(broadcast_buffers=False)
            make_accelerator(self, *a, **{**kwargs, "kwargs_handlers": [*kwargs.get("kwargs_handlers", []), handler]})

        accelerate.Accelerator.__init__ = without_buffer_broadcast
    script = importlib.import_module(args.script)
    script.configure_attention = functools.partial(pipeline.configure_attention, cudnn=args.cudnn_attention == "on",
                                                   mask_check=args.mask_sync == "on")
    script.main(args.script_args)

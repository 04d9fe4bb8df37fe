"""Run a project script with one of its speed-relevant defaults switched (a diagnostic for A/B timing runs).

    python results/run_variant.py --mask_sync off train ARGS...          # = python train.py ARGS..., patched
    python results/run_variant.py --cudnn_attention on benchmark ARGS...
    torchrun --standalone --nproc-per-node=2 results/run_variant.py --mask_sync off train ARGS...

--mask_sync off: transformers (masking_utils._ignore_bidirectional_mask_sdpa) calls `padding_mask.all()` in
every forward to skip building the attention mask when nothing is padded; the Python `if` on a GPU tensor
makes the host wait for the GPU once per step. Patched, the check always answers "build the mask" (the
same logits: the mask is then all ones), so the host can queue the next step while the GPU works.

--cudnn_attention on: keep cuDNN among PyTorch's attention kernels (the scripts turn it off, see
pipeline.disable_cudnn_attention), to time the old default.

--ddp_broadcast_buffers off: DDP (through accelerate) stops broadcasting the model's buffers from rank 0
before every forward, one collective less per step. Safe for these models: their buffers (position and
token-type ids) never change.
"""

import argparse
import importlib
import sys
from pathlib import Path

import transformers.masking_utils as masking_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's scripts

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask_sync", choices=["on", "off"], default="on", help="transformers' per-forward check.")
    parser.add_argument("--cudnn_attention", choices=["on", "off"], default="off",
                        help="cuDNN attention kernels (the scripts' default: off).")
    parser.add_argument("--ddp_broadcast_buffers", choices=["on", "off"], default="on",
                        help="DDP's per-forward buffer broadcast (train.py under torchrun).")
    parser.add_argument("script", choices=["train", "analyze", "benchmark"], help="The project script to run.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Its arguments.")
    args = parser.parse_args()
    if args.mask_sync == "off":
        masking_utils._ignore_bidirectional_mask_sdpa = lambda *a, **k: False
    if args.ddp_broadcast_buffers == "off":
        import accelerate

        make_accelerator = accelerate.Accelerator.__init__

        def without_buffer_broadcast(self, *a, **kwargs):
            handler = accelerate.DistributedDataParallelKwargs(broadcast_buffers=False)
            make_accelerator(self, *a, **{**kwargs, "kwargs_handlers": [*kwargs.get("kwargs_handlers", []), handler]})

        accelerate.Accelerator.__init__ = without_buffer_broadcast
    script = importlib.import_module(args.script)
    if args.cudnn_attention == "on":
        script.disable_cudnn_attention = lambda: None
    script.main(args.script_args)

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
    parser.add_argument("script", choices=["train", "analyze", "benchmark"], help="The project script to run.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Its arguments.")
    args = parser.parse_args()
    if args.mask_sync == "off":
        masking_utils._ignore_bidirectional_mask_sdpa = lambda *a, **k: False
    script = importlib.import_module(args.script)
    if args.cudnn_attention == "on":
        script.disable_cudnn_attention = lambda: None
    script.main(args.script_args)

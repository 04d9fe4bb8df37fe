"""Run a project script with transformers' per-forward mask check taken out (a diagnostic, not the product).

    python results/without_mask_sync.py train ARGS...        # = python train.py ARGS..., patched
    torchrun --nproc-per-node=2 results/without_mask_sync.py train ARGS...

transformers (masking_utils._ignore_bidirectional_mask_sdpa) calls `padding_mask.all()` in every forward
to skip building the attention mask when nothing is padded. The Python `if` on a GPU tensor makes the host
wait for the GPU every step. Here the check always answers "build the mask" (the same logits: the mask is
all ones then), so the host can queue the next step while the GPU works.
"""

import importlib
import sys

import transformers.masking_utils as masking_utils

masking_utils._ignore_bidirectional_mask_sdpa = lambda *args, **kwargs: False

if __name__ == "__main__":
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])

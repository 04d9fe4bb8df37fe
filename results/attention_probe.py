"""Where the first epoch's extra time goes: the cost of a new (batch, padded length) shape in a training step.

    python results/attention_probe.py MODEL_DIR [MODEL_DIR ...] --output OUT.json
    python results/attention_probe.py --roberta_tokenizer ../shared/tokenizers/roberta-base --output OUT.json

For each model (bf16 autocast, batch 32 × 4 choices, a padding mask as dynamic padding gives), a
forward+backward at 12 lengths never seen before, each timed twice: the first call pays any per-shape
set-up, the second does not. Done with PyTorch's default attention kernels and again with cuDNN's taken
out (`torch.backends.cuda.enable_cudnn_sdp(False)`), on other lengths so no set-up is cached. Also lists
the attention kernels that one step launches. GPU only; a diagnostic for issues 4 and 5, not a test.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForMultipleChoice

from benchmark import load_tokenizer, random_roberta

ATTENTION_WORDS = ("attention", "fmha", "flash", "cudnn", "sdpa", "mha")


def step(model, length: int, batch: int = 32):
    ids = torch.randint(1000, 2000, (batch, 4, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[::2, :, length - 5:] = 0  # padded rows: the model passes an attention mask
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    logits.float().sum().backward()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def probe(model) -> dict:
    model = model.cuda().train()
    step(model, 32)  # CUDA context, cuBLAS handles
    out = {"attention_implementation": getattr(model.config, "_attn_implementation", None)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(model, 48)
        torch.cuda.synchronize()
    out["attention_kernels"] = sorted({e.name[:120] for e in prof.events()
                                       if any(w in e.name.lower() for w in ATTENTION_WORDS)})[:8]
    for name, cudnn, first_length in (("default", True, 40), ("no_cudnn_sdpa", False, 41)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        firsts, seconds = [], []
        for length in range(first_length, first_length + 24, 2):
            firsts.append(timed(lambda: step(model, length)))
            seconds.append(timed(lambda: step(model, length)))
        out[name] = {"new_shape_step_ms": round(1000 * sum(firsts) / len(firsts), 1),
                     "seen_shape_step_ms": round(1000 * sum(seconds) / len(seconds), 1)}
    torch.backends.cuda.enable_cudnn_sdp(True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="Model directories (save_pretrained format).")
    parser.add_argument("--roberta_tokenizer", type=Path, default=None,
                        help="Also probe the roberta-base architecture (random weights) with this tokenizer's vocabulary.")
    parser.add_argument("--output", type=Path, required=True, help="Results JSON.")
    args = parser.parse_args(argv)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python results/attention_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "models": {}}
    for m in args.models:
        result["models"][Path(m).name] = probe(AutoModelForMultipleChoice.from_pretrained(m, dtype=torch.float32))
    if args.roberta_tokenizer:
        result["models"]["roberta-base (random weights)"] = probe(random_roberta(load_tokenizer(args.roberta_tokenizer)))
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

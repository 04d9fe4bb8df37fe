"""Pairwise influence scores from kronfluence's fitted factors, with one fused matmul per module.

    python analyze.py --checkpoint_dir checkpoints/swag --use_half_precision --scoring fused

kronfluence fits the factors (covariance, eigendecomposition, lambda) and preconditions the query
gradients with its own `FactorConfig` code; only the training side differs from its loop:

- one pass over the training set scores a whole chunk of queries (as many preconditioned query
  gradients as fit in GPU memory, all 2,000 SWAG queries in about four passes on an H200) with one
  (queries × params) @ (params × examples) matmul per module and batch;
- per-example gradients are formed directly, summed over the four choices inside the matmul
  (kronfluence materialises one gradient per choice, then sums);
- no parameter gradients: only activation gradients flow backwards;
- batches are sorted by length, so dynamic padding wastes little; scores return in dataset order.

Scores are linear in the training gradient, so this is the same computation as kronfluence's
pairwise scores for the same factors (tests/test_fused.py checks it on CPU). Under
`torch.distributed` each rank scores its share of the training batches and the ranks sum the matrix.
"""

import logging
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from kronfluence.factor.config import FactorConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import NUM_CHOICES, UserError

logger = logging.getLogger(__name__)

FREE_MEMORY_FRACTION = 0.6  # of free GPU memory for the preconditioned query gradients


def length_order(dataset) -> np.ndarray:
    """Row order by longest choice, so that dynamically padded batches hold similar lengths."""
    return np.argsort([max(len(ids) for ids in row) for row in dataset["input_ids"]], kind="stable")


def linear_module_names(model: nn.Module) -> list:
    """Every nn.Linear by kronfluence's module name: what it tracks by default (identity has no factors to name them)."""
    return sorted({n.removesuffix(".original_module") for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def tracked_linears(model: nn.Module, names) -> dict:
    """The nn.Linear modules that have factors, by kronfluence's module name (a prepared model's
    wrappers hold the original module as `.original_module`)."""
    found = {}
    for path, module in model.named_modules():
        path = path.removesuffix(".original_module")
        if path in names and isinstance(module, nn.Linear):
            found[path] = module
    missing = sorted(set(names) - set(found))
    if missing:
        raise UserError(f"--scoring fused supports nn.Linear modules only; no Linear for {missing[:3]}; "
                        f"use --scoring kronfluence")
    return found


class PerExampleGradients:
    """Hooks that hand `callback(name, weight_grad, bias_grad)` each module's per-example gradient
    during the backward pass: (examples, d_out, d_in) and (examples, d_out) (None without a bias),
    summed over the choices. Weight and bias stay apart so that every matmul keeps aligned shapes
    (a d_in + 1 column falls back to slow GPU kernels)."""

    def __init__(self, modules: dict, dtype: torch.dtype):
        self.modules, self.dtype = modules, dtype
        self.num_examples, self.callback, self.handles = 0, None, []
        self.block = None  # the (queries × batch) slice of the score matrix being filled

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._forward_hook(name, module.bias is not None)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _forward_hook(self, name: str, has_bias: bool):
        def hook(module, inputs, output):
            activation = inputs[0].detach()

            def on_grad(grad):
                self.callback(name, *self.gradient(activation, grad, has_bias))  # returns None: grad unchanged

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def gradient(self, activation, output_grad, has_bias: bool):
        n = self.num_examples
        activation = activation.to(self.dtype).reshape(n, -1, activation.size(-1))  # choices × tokens per example
        output_grad = output_grad.detach().to(self.dtype).reshape(n, -1, output_grad.size(-1))
        weight = torch.bmm(output_grad.transpose(1, 2), activation)
        return weight, (output_grad.sum(dim=1) if has_bias else None)


def with_bias_column(weight: torch.Tensor, bias) -> torch.Tensor:
    """kronfluence's layout: the bias gradient as the last input column."""
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def prepared_storages(factors: dict, strategy: str, names, score_args, device) -> dict:
    """Per module, the factors after kronfluence's own `prepare` (damping, inverse eigenvalues)."""
    storages = {}
    for name in names:
        storage = {factor: per_module[name].clone() for factor, per_module in factors.items() if name in per_module}
        FactorConfig.CONFIGS[strategy].prepare(storage=storage, score_args=score_args, device=device)
        storages[name] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in storage.items()}
    return storages


def _backward(model, task, batch, device, amp_dtype, measurement: bool):
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = task.compute_measurement(batch, model) if measurement else task.compute_train_loss(batch, model, sample=False)
    loss.backward()


def _activation_grads_only(model: nn.Module):
    """Freeze the parameters and let gradients start at the input embeddings instead; returns an undo."""
    embeddings = model.get_input_embeddings()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_())

    def undo():
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return undo


def queries_per_pass(modules: dict, dtype: torch.dtype, device: torch.device, num_queries: int) -> int:
    """How many preconditioned query gradients (one full copy of the tracked weights each) fit in
    FREE_MEMORY_FRACTION of the free GPU memory; on CPU, all of them."""
    if device.type != "cuda":
        return num_queries
    torch.cuda.empty_cache()
    per_query = sum(m.out_features * (m.in_features + (m.bias is not None)) for m in modules.values()) * dtype.itemsize
    return max(1, min(num_queries, int(FREE_MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0] // per_query)))


class _Clock:
    """Seconds between laps, synchronising the GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        seconds, self.last = now - self.last, now
        return seconds


def fused_pairwise_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, query_dataset,
                          train_dataset, collator, query_batch_size: int, train_batch_size: int,
                          device: torch.device, max_queries_per_pass: int = 0, disable_tqdm: bool = False,
                          timings: dict = None):
    """(queries × train) float32 scores, rows and columns in dataset order (see the module docstring).
    `timings`, if given, receives the seconds spent on query gradients and on training passes."""
    names = sorted(next(iter(factors.values()))) if factors else linear_module_names(model)
    modules = tracked_linears(model, names)
    storages = prepared_storages(factors, strategy, names, score_args, device)
    config = FactorConfig.CONFIGS[strategy]
    grad_dtype, score_dtype = score_args.per_sample_gradient_dtype, score_args.score_dtype
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()

    q_order, t_order = length_order(query_dataset), length_order(train_dataset)
    queries, train = query_dataset.select(q_order), train_dataset.select(t_order)
    per_pass = min(max_queries_per_pass or queries_per_pass(modules, score_dtype, device, len(queries)), len(queries))
    passes = math.ceil(len(queries) / per_pass)
    logger.info("fused scoring: %d queries × %d train rows, %d queries per pass (%d pass(es)), rank %d of %d",
                len(queries), len(train), per_pass, passes, rank, world)

    scores = torch.zeros(len(queries), len(train), dtype=torch.float32, device=device)
    query_grads, filled = {}, {}  # per module: preconditioned (weight, bias) rows of the current chunk

    def keep_query(name, weight, bias):
        gradient = config.precondition_gradient(gradient=with_bias_column(weight, bias).to(score_args.precondition_dtype),
                                                storage=storages[name]).to(score_dtype)
        w, b = query_grads[name]
        rows = slice(filled[name], filled[name] + gradient.size(0))
        w[rows] = gradient[..., :weight.size(-1)].flatten(1)
        if b is not None:
            b[rows] = gradient[..., -1]
        filled[name] = rows.stop

    def add_scores(name, weight, bias):
        w, b = query_grads[name]
        block = (w @ weight.flatten(1).T).float()
        if b is not None:
            block += (b @ bias.T).float()
        hooks.block.add_(block)

    hooks, undo = PerExampleGradients(modules, grad_dtype), None
    try:
        undo = _activation_grads_only(model)
        with hooks:
            for start in range(0, len(queries), per_pass):
                chunk = queries.select(range(start, min(start + per_pass, len(queries))))
                query_grads.clear()
                for name, m in modules.items():
                    query_grads[name] = (
                        torch.empty(len(chunk), m.out_features * m.in_features, dtype=score_dtype, device=device),
                        torch.empty(len(chunk), m.out_features, dtype=score_dtype, device=device)
                        if m.bias is not None else None)
                    filled[name] = 0
                hooks.callback, hooks.dtype = keep_query, grad_dtype  # kronfluence: query side in this dtype,
                clock = _Clock(device)
                for batch in DataLoader(chunk, batch_size=query_batch_size, collate_fn=collator):
                    hooks.num_examples = batch["labels"].size(0)
                    _backward(model, task, batch, device, score_args.amp_dtype, measurement=True)
                if any(count != len(chunk) for count in filled.values()):
                    raise RuntimeError(f"query gradients reached {sorted(set(filled.values()))} of {len(chunk)} rows")
                query_seconds = clock.lap()
                hooks.dtype = score_dtype  # ... training side in the score dtype
                rows = slice(start, start + len(chunk))
                loader = DataLoader(train, batch_size=train_batch_size, collate_fn=collator)
                column = 0
                for step, batch in enumerate(tqdm(loader, desc=f"fused scores, pass {start // per_pass + 1}/{passes}",
                                                  disable=disable_tqdm or rank != 0)):
                    size = batch["labels"].size(0)
                    if step % world == rank:
                        hooks.block = scores[rows, column:column + size]
                        hooks.callback, hooks.num_examples = add_scores, size
                        _backward(model, task, batch, device, score_args.amp_dtype, measurement=False)
                    column += size
                query_grads.clear()
                if timings is not None:
                    timings["query_seconds"] = timings.get("query_seconds", 0.0) + query_seconds
                    timings["train_seconds"] = timings.get("train_seconds", 0.0) + clock.lap()
                    timings["passes"], timings["queries_per_pass"] = passes, per_pass
    finally:
        if undo:
            undo()
    if world > 1:
        dist.all_reduce(scores)
    out = torch.empty_like(scores, device="cpu")
    out[np.ix_(q_order, t_order)] = scores.cpu()
    return out

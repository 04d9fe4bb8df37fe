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

import numpy as np
import torch
import torch.distributed as dist
from kronfluence.factor.config import FactorConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import NUM_CHOICES, UserError

logger = logging.getLogger(__name__)

FREE_MEMORY_FRACTION = 0.5  # of free GPU memory for the preconditioned query gradients


def length_order(dataset) -> np.ndarray:
    """Row order by longest choice, so that dynamically padded batches hold similar lengths."""
    return np.argsort([max(len(ids) for ids in row) for row in dataset["input_ids"]], kind="stable")


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
    """Hooks that hand `callback(name, gradient)` each module's per-example gradient,
    (examples, d_out, d_in + bias) summed over the choices, during the backward pass."""

    def __init__(self, modules: dict, dtype: torch.dtype):
        self.modules, self.dtype = modules, dtype
        self.num_examples, self.callback, self.handles = 0, None, []

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
                self.callback(name, self.gradient(activation, grad, has_bias))  # returns None: grad unchanged

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def gradient(self, activation, output_grad, has_bias: bool) -> torch.Tensor:
        n = self.num_examples
        activation, output_grad = activation.to(self.dtype), output_grad.detach().to(self.dtype)
        if has_bias:
            activation = torch.cat([activation, activation.new_ones(*activation.shape[:-1], 1)], dim=-1)
        activation = activation.reshape(n, -1, activation.size(-1))  # choices × tokens flattened per example
        output_grad = output_grad.reshape(n, -1, output_grad.size(-1))
        return torch.bmm(output_grad.transpose(1, 2), activation)


def prepared_storages(factors: dict, strategy: str, names, score_args, device) -> dict:
    """Per module, the factors after kronfluence's own `prepare` (damping, inverse eigenvalues)."""
    storages = {}
    for name in names:
        storage = {factor: per_module[name] for factor, per_module in factors.items() if name in per_module}
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


def fused_pairwise_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, query_dataset,
                          train_dataset, collator, query_batch_size: int, train_batch_size: int,
                          device: torch.device, max_queries_per_pass: int = 0, disable_tqdm: bool = False):
    """(queries × train) float32 scores, rows and columns in dataset order (see the module docstring)."""
    names = sorted(next(iter(factors.values())) if factors else  # identity: no factors, every Linear
                   {n.removesuffix(".original_module") for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    modules = tracked_linears(model, names)
    storages = prepared_storages(factors, strategy, names, score_args, device)
    config = FactorConfig.CONFIGS[strategy]
    grad_dtype, score_dtype = score_args.per_sample_gradient_dtype, score_args.score_dtype
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    undo = _activation_grads_only(model)

    q_order, t_order = length_order(query_dataset), length_order(train_dataset)
    queries, train = query_dataset.select(q_order), train_dataset.select(t_order)
    params_per_query = sum(m.out_features * (m.in_features + (m.bias is not None)) for m in modules.values())
    per_pass = max_queries_per_pass or len(queries)
    if device.type == "cuda" and not max_queries_per_pass:
        free = torch.cuda.mem_get_info(device)[0]
        per_pass = max(1, int(FREE_MEMORY_FRACTION * free // (params_per_query * score_dtype.itemsize)))
    per_pass = min(per_pass, len(queries))
    passes = math.ceil(len(queries) / per_pass)
    logger.info("fused scoring: %d queries × %d train rows, %d queries per pass (%d pass(es)), rank %d of %d",
                len(queries), len(train), per_pass, passes, rank, world)

    scores = torch.zeros(len(queries), len(train), dtype=torch.float32, device=device)
    preconditioned = {}

    def keep_query(name, gradient):
        gradient = config.precondition_gradient(gradient=gradient.to(score_args.precondition_dtype),
                                                storage=storages[name])
        preconditioned[name].append(gradient.to(score_dtype).flatten(1))

    hooks = PerExampleGradients(modules, grad_dtype)
    try:
        with hooks:
            for start in range(0, len(queries), per_pass):
                chunk = queries.select(range(start, min(start + per_pass, len(queries))))
                preconditioned.clear()
                preconditioned.update({name: [] for name in names})
                hooks.callback = keep_query
                for batch in DataLoader(chunk, batch_size=query_batch_size, collate_fn=collator):
                    hooks.num_examples = batch["labels"].size(0)
                    _backward(model, task, batch, device, score_args.amp_dtype, measurement=True)
                query_grads = {name: torch.cat(parts) for name, parts in preconditioned.items()}
                preconditioned.clear()
                rows = slice(start, start + len(chunk))
                loader = DataLoader(train, batch_size=train_batch_size, collate_fn=collator)
                column = 0
                for step, batch in enumerate(tqdm(loader, desc=f"fused scores, pass {start // per_pass + 1}/{passes}",
                                                  disable=disable_tqdm or rank != 0)):
                    size = batch["labels"].size(0)
                    if step % world == rank:
                        block = scores[rows, column:column + size]

                        def add_scores(name, gradient, block=block):
                            block.add_((query_grads[name] @ gradient.flatten(1).T).float())
                        hooks.callback, hooks.num_examples = add_scores, size
                        _backward(model, task, batch, device, score_args.amp_dtype, measurement=False)
                    column += size
                del query_grads
    finally:
        undo()
    if world > 1:
        dist.all_reduce(scores)
    out = torch.empty_like(scores, device="cpu")
    out[np.ix_(q_order, t_order)] = scores.cpu()
    return out

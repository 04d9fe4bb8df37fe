"""Pairwise influence scores from kronfluence's fitted factors, with one fused matmul per module.

    python analyze.py --checkpoint_dir checkpoints/swag --use_half_precision --scoring fused

kronfluence fits the factors (covariance, eigendecomposition, lambda) and preconditions the query
gradients with its own `FactorConfig` code; only the training side differs from its loop:

- one pass over the training set scores a whole chunk of queries with one (queries × params) @
  (params × examples) matmul per module and batch; a pass holds as many preconditioned query gradients
  as fit in the memory available when scoring starts (all 2,000 SWAG queries in about four passes on an
  H200), and an out-of-memory error halves the pass and redoes it, keeping the finished passes;
- per-example gradients are formed directly, summed over the four choices inside the matmul
  (kronfluence materialises one gradient per choice, then sums);
- no parameter gradients: only activation gradients flow backwards;
- batches are sorted by length, longest first, so dynamic padding wastes little and a batch size that
  does not fit fails at once; scores return in dataset order;
- the training micro-batches of a pass are collated by DataLoader workers into pinned memory while the GPU
  works on the previous ones (the host's collation costs 40-60 ms per 128 rows of real text on one core).

Scores are linear in the training gradient, so this is the same computation as kronfluence's
pairwise scores for the same factors (tests/test_fused.py checks it on CPU). Under
`torch.distributed` each rank scores its share of the training batches and the ranks sum the matrix.
"""

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from kronfluence.factor.config import FactorConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from utils import UserError, available_memory, out_of_memory_detail, retry_on_oom

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.9  # of the available memory a pass plans to use; the allocator's fragmentation takes the rest
# Training rows per micro-batch below which a smaller micro-batch is not taken to save passes (below this the GPU's
# kernels run far from full width).
MIN_TRAIN_MICRO = 32
# A pass costs a forward and backward over every training row; its contraction reads every query gradient of the
# pass once per training micro-batch. One training row's forward and backward costs about as much as reading this
# many query gradients (benchmark_h200.json, --fast on roberta-base, one H200: 0.821 s a pass of 2,048 rows and
# 0.000881 s a query per pass at 128 rows a micro-batch, so (0.821 / 2048) / (0.000881 / 16) = 7.3).
PASS_ROW_COST = 7.3


def longest_first(dataset) -> np.ndarray:
    """Row order by longest choice, longest first: batches hold similar lengths, so dynamic padding wastes little,
    and the batch that needs the most memory comes first, so a size that does not fit fails before work is lost."""
    return np.argsort([-max(len(ids) for ids in row) for row in dataset["input_ids"]], kind="stable")


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


def model_weights(model: nn.Module) -> dict:
    """The model's parameters by their own names (without kronfluence's wrappers and the constants they add)."""
    return {name.replace(".original_module", ""): p for name, p in model.named_parameters()
            if not name.endswith("._constant")}


@torch.no_grad()
def load_weights(model: nn.Module, weights: dict) -> None:
    """Copy `weights` (model_weights's names) into the model's parameters, every one of them."""
    params = model_weights(model)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ValueError(f"the weights lack {missing[:3]}")
    for name, p in params.items():
        p.copy_(weights[name])


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


def query_gradient_bytes(modules: dict, dtype: torch.dtype) -> int:
    """Bytes of one preconditioned query gradient: a full copy of the tracked weights (and biases)."""
    return sum(m.out_features * (m.in_features + (m.bias is not None)) for m in modules.values()) * dtype.itemsize


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


@dataclass
class PassPlan:
    """How one rank splits the work: queries per pass, and the rows of each forward/backward (micro-batches of the
    query and training batches; a training batch stays the unit that ranks share)."""
    per_pass: int
    query_micro: int
    train_micro: int
    capacity: Optional[int] = None  # queries that fit in one pass by the memory plan (None: no limit known)
    retries: int = 0

    def shrink(self, stage: str, detail: str, flag_hint: str) -> None:
        """After an out-of-memory error: halve the pass, else the training micro-batch, else the query one."""
        for field, what in (("per_pass", "queries per pass"), ("train_micro", "training rows per micro-batch"),
                            ("query_micro", "queries per micro-batch")):
            size = getattr(self, field)
            if size > 1:
                setattr(self, field, size // 2)
                self.retries += 1
                logger.warning("%s: out of GPU memory (%s); retrying with %d %s", stage, detail, size // 2, what)
                return
        raise UserError(f"{stage}: out of GPU memory with one query per pass and one row per batch ({detail}); "
                        f"{flag_hint}")


class FusedScorer:
    """The per-module state of the fused pass: tracked modules, prepared factors, hooks, query gradients."""

    def __init__(self, model, task, factors: dict, strategy: str, score_args, collator, device: torch.device,
                 num_workers: int = 0, precondition=None, query_weights: dict = None, train_weights: dict = None):
        names = sorted(next(iter(factors.values()))) if factors else linear_module_names(model)
        self.model, self.task, self.collator, self.device, self.score_args = model, task, collator, device, score_args
        self.num_workers = num_workers
        self.modules = tracked_linears(model, names)
        self.config = FactorConfig.CONFIGS[strategy]
        if precondition is None:  # kronfluence's own preconditioning of the strategy
            storages = prepared_storages(factors, strategy, names, score_args, device)
            precondition = lambda name, gradient: self.config.precondition_gradient(  # noqa: E731
                gradient=gradient, storage=storages[name])
        self.precondition = precondition
        # the query side's weights, when they are not the training side's (source.py: the analysed model's queries
        # against an earlier checkpoint's training gradients)
        self.query_weights = query_weights
        if query_weights is not None and train_weights is None:
            train_weights = {name: p.detach().clone() for name, p in model_weights(model).items()}
        self.train_weights = train_weights  # what the model holds, put back after each pass's query side
        self.hooks = PerExampleGradients(self.modules, score_args.per_sample_gradient_dtype)
        self.query_grads, self.filled = {}, {}  # per module: preconditioned (weight, bias) rows of the current pass

    def _precondition(self, name, weight, bias):
        gradient = with_bias_column(weight, bias).to(self.score_args.precondition_dtype)
        return self.precondition(name, gradient).to(self.score_args.score_dtype)

    def _keep_query(self, name, weight, bias):
        gradient = self._precondition(name, weight, bias)
        w, b = self.query_grads[name]
        rows = slice(self.filled[name], self.filled[name] + gradient.size(0))
        w[rows] = gradient[..., :weight.size(-1)].flatten(1)
        if b is not None:
            b[rows] = gradient[..., -1]
        self.filled[name] = rows.stop

    def _add_scores(self, name, weight, bias):
        w, b = self.query_grads[name]
        block = (w @ weight.flatten(1).T).float()
        if b is not None:
            block += (b @ bias.T).float()
        self.hooks.block.add_(block)

    def _add_self_scores(self, name, weight, bias):
        """kronfluence's SelfScoreTracker arithmetic: <precondition(g), g> per example, in the score dtype."""
        dtype = self.score_args.score_dtype
        gradient = with_bias_column(weight, bias)
        products = self._precondition(name, weight, bias) * gradient.to(self.score_args.precondition_dtype).to(dtype)
        self.hooks.block.add_(products.sum(dim=(1, 2)).float())

    def _backward(self, rows, measurement: bool):
        """One forward/backward over `rows`, the hooks handing each module's per-example gradients on."""
        for batch in DataLoader(rows, batch_size=len(rows), collate_fn=self.collator):
            self._run(batch, measurement)

    def _run(self, batch: dict, measurement: bool):
        self.hooks.num_examples = batch["labels"].size(0)
        _backward(self.model, self.task, batch, self.device, self.score_args.amp_dtype, measurement)

    def train_batches(self, train, train_batch_size: int, train_micro: int, desc: str, disable_tqdm: bool):
        """(start, stop, collated batch) for this rank's training micro-batches, in order: ranks share whole training
        batches, whatever their micro-batches; DataLoader workers collate ahead into pinned memory."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        spans = [(micro, min(micro + train_micro, stop))
                 for step, start in enumerate(range(0, len(train), train_batch_size)) if step % world == rank
                 for stop in [min(start + train_batch_size, len(train))]
                 for micro in range(start, stop, train_micro)]
        loader = DataLoader(train, batch_sampler=[range(a, b) for a, b in spans], collate_fn=self.collator,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        batches = tqdm(loader, desc=desc, total=len(spans), disable=disable_tqdm or rank != 0)
        for batch, (start, stop) in zip(batches, spans):  # the loader first: its bar closes when it ends
            yield start, stop, batch

    def working_memory(self, queries, train, plan: PassPlan) -> int:
        """Peak bytes above the current allocation that the first (longest) query and training micro-batches
        need, preconditioning included. 0 on CPU."""
        if self.device.type != "cuda":
            return 0
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.hooks.callback, self.hooks.dtype = self._precondition, self.score_args.per_sample_gradient_dtype
        self._backward(queries.select(range(min(plan.query_micro, len(queries)))), measurement=True)
        self.hooks.callback, self.hooks.dtype = (lambda *_: None), self.score_args.score_dtype
        self._backward(train.select(range(min(plan.train_micro, len(train)))), measurement=False)
        return torch.cuda.max_memory_allocated(self.device) - base

    def score_pass(self, chunk, train, block: torch.Tensor, plan: PassPlan, train_batch_size: int,
                   desc: str, disable_tqdm: bool) -> tuple:
        """Scores of the queries `chunk` against every training row of this rank, added into `block`
        (chunk × train); returns the seconds of the query side and of the training side."""
        clock = _Clock(self.device)
        self.query_grads.clear()
        for name, m in self.modules.items():
            self.query_grads[name] = (
                torch.empty(len(chunk), m.out_features * m.in_features, dtype=self.score_args.score_dtype,
                            device=self.device),
                torch.empty(len(chunk), m.out_features, dtype=self.score_args.score_dtype, device=self.device)
                if m.bias is not None else None)
            self.filled[name] = 0
        # kronfluence: the query side in the per-sample gradient dtype, the training side in the score dtype
        self.hooks.callback, self.hooks.dtype = self._keep_query, self.score_args.per_sample_gradient_dtype
        if self.query_weights is not None:
            load_weights(self.model, self.query_weights)
        try:
            for start in range(0, len(chunk), plan.query_micro):
                self._backward(chunk.select(range(start, min(start + plan.query_micro, len(chunk)))), measurement=True)
        finally:
            if self.query_weights is not None:
                load_weights(self.model, self.train_weights)
        if any(count != len(chunk) for count in self.filled.values()):
            raise RuntimeError(f"query gradients reached {sorted(set(self.filled.values()))} of {len(chunk)} rows")
        query_seconds = clock.lap()
        self.hooks.callback, self.hooks.dtype = self._add_scores, self.score_args.score_dtype
        for start, stop, batch in self.train_batches(train, train_batch_size, plan.train_micro, desc, disable_tqdm):
            self.hooks.block = block[:, start:stop]
            self._run(batch, measurement=False)
        self.query_grads.clear()
        return query_seconds, clock.lap()


def plan_passes(scorer: FusedScorer, queries, train, query_batch_size: int, train_batch_size: int,
                max_queries_per_pass: int = 0) -> PassPlan:
    """Queries per pass from the memory available now: what is left after the longest micro-batches' working
    memory, in MEMORY_HEADROOM of it, holds that many preconditioned query gradients. A micro-batch that does not
    fit at all is halved first."""
    plan = PassPlan(len(queries), min(query_batch_size, len(queries)), min(train_batch_size, len(train)))
    if max_queries_per_pass:
        plan.per_pass = min(max_queries_per_pass, len(queries))
        return plan
    per_query = query_gradient_bytes(scorer.modules, scorer.score_args.score_dtype)
    hint = "free memory on the GPU (other jobs, a larger --max_memory_gb) or lower --max_length"
    while True:
        clear_device_cache(garbage_collection=True)
        room = available_memory(scorer.device)
        if room is None:  # CPU: every query in one pass
            return plan
        try:
            working = scorer.working_memory(queries, train, plan)
        except Exception as exc:
            if not should_reduce_batch_size(exc):
                raise
            detail = out_of_memory_detail(exc, scorer.device)
        else:
            plan.capacity = int((room * MEMORY_HEADROOM - working) // per_query)
            if plan.capacity >= 1:
                plan.per_pass = min(plan.capacity, len(queries))
                logger.info("fused scoring: %.1f GiB available, %.1f GiB per micro-batch of %d training rows, %.2f "
                            "GiB per query gradient: %d queries per pass", room / 2**30, working / 2**30,
                            plan.train_micro, per_query / 2**30, plan.per_pass)
                chosen = fewer_passes(scorer, queries, train, plan, room, per_query)
                if chosen is not plan:
                    logger.info("fused scoring: %d training rows per micro-batch instead, %d queries per pass",
                                chosen.train_micro, chosen.per_pass)
                return chosen
            detail = (f"a pass needs {(working + per_query) / 2**30:.1f} GiB, {room / 2**30:.1f} GiB available")
        plan.per_pass = 1  # only the micro-batches are left to halve
        plan.shrink("fused scores", detail, hint)


def fewer_passes(scorer: FusedScorer, queries, train, plan: PassPlan, room: int, per_query: int) -> PassPlan:
    """While the queries take several passes, a smaller training micro-batch leaves room for more query gradients
    per pass but reads them more often: among the micro-batches halved down to MIN_TRAIN_MICRO rows, the one with
    the least estimated time, per training row passes × PASS_ROW_COST + queries / rows per micro-batch (the scores
    are the same sums)."""
    def cost(p: PassPlan) -> float:
        return math.ceil(len(queries) / p.per_pass) * PASS_ROW_COST + len(queries) / p.train_micro

    best = trial = plan
    while trial.per_pass < len(queries) and trial.train_micro // 2 >= MIN_TRAIN_MICRO:
        trial = replace(trial, train_micro=trial.train_micro // 2)
        try:
            trial.capacity = int((room * MEMORY_HEADROOM - scorer.working_memory(queries, train, trial)) // per_query)
        except Exception as exc:
            if not should_reduce_batch_size(exc):
                raise
            clear_device_cache(garbage_collection=True)
            break
        trial.per_pass = min(max(trial.capacity, 1), len(queries))
        if cost(trial) < cost(best):
            best = trial
    return best


def fused_pairwise_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, query_dataset,
                          train_dataset, collator, query_batch_size: int, train_batch_size: int,
                          device: torch.device, max_queries_per_pass: int = 0, disable_tqdm: bool = False,
                          timings: dict = None, num_workers: int = 0, precondition=None, query_weights: dict = None,
                          train_weights: dict = None):
    """(queries × train) float32 scores, rows and columns in dataset order (see the module docstring). An
    out-of-memory error inside a pass halves the pass (then the micro-batches) and redoes that pass alone.
    `timings`, if given, receives the seconds spent on query gradients and on training passes, and the plan.
    `num_workers`: DataLoader processes collating the training micro-batches (the scores do not depend on it).
    `precondition(module name, gradient)`, if given, replaces the strategy's preconditioning of the query gradients
    (with the bias as the last input column); `query_weights` (model_weights's names), if given, are the weights the
    query gradients are taken at, the model's own being the training side's (`train_weights`, if given, a copy of
    them that is put back after each pass's query side; else one is made)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    scorer = FusedScorer(model, task, factors, strategy, score_args, collator, device, num_workers, precondition,
                         query_weights, train_weights)
    q_order, t_order = longest_first(query_dataset), longest_first(train_dataset)
    queries, train = query_dataset.select(q_order), train_dataset.select(t_order)
    scores = torch.zeros(len(queries), len(train), dtype=torch.float32, device=device)
    seconds = {"query_seconds": 0.0, "train_seconds": 0.0}
    undo = _activation_grads_only(model)
    try:
        with scorer.hooks:
            plan = plan_passes(scorer, queries, train, query_batch_size, train_batch_size, max_queries_per_pass)
            logger.info("fused scoring: %d queries × %d train rows, %d queries per pass, rank %d of %d",
                        len(queries), len(train), plan.per_pass, rank, world)
            start, passes = 0, 0
            while start < len(queries):
                def one_pass(start=start):  # as many queries as the plan holds now (an out-of-memory retry shrinks it)
                    rows = slice(start, min(start + plan.per_pass, len(queries)))
                    desc = f"fused scores, queries {rows.start + 1}-{rows.stop} of {len(queries)}"
                    return rows, scorer.score_pass(queries.select(range(rows.start, rows.stop)), train, scores[rows],
                                                   plan, train_batch_size, desc, disable_tqdm)

                def shrink(detail, start=start):  # the failed pass is redone from scratch; the finished rows stay
                    scorer.query_grads.clear()
                    scores[start:] = 0
                    plan.shrink("fused scores", detail, "free memory on the GPU or lower --max_length")
                rows, (query_s, train_s) = retry_on_oom(one_pass, shrink, device)
                seconds["query_seconds"] += query_s
                seconds["train_seconds"] += train_s
                start, passes = rows.stop, passes + 1
    finally:
        undo()
    if timings is not None:
        timings.update({k: round(v, 3) for k, v in seconds.items()}, passes=passes, queries_per_pass=plan.per_pass,
                       pass_capacity=plan.capacity, query_micro_batch=plan.query_micro,
                       train_micro_batch=plan.train_micro, out_of_memory_retries=plan.retries)
    if world > 1:
        dist.all_reduce(scores)
    out = torch.empty_like(scores, device="cpu")
    out[np.ix_(q_order, t_order)] = scores.cpu()
    return out


def fused_self_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, train_dataset, collator,
                      train_batch_size: int, device: torch.device, disable_tqdm: bool = False, num_workers: int = 0):
    """(train,) float32 self-influence scores <H^-1 g_i, g_i> of every training row, in dataset order: kronfluence's
    `compute_self_scores` for the same factors, from the per-example gradients formed as in the pairwise pass.
    An out-of-memory error halves the micro-batch and redoes the pass (the longest batch, where it fails, is first)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.eval()
    scorer = FusedScorer(model, task, factors, strategy, score_args, collator, device, num_workers)
    order = longest_first(train_dataset)
    train = train_dataset.select(order)
    scores = torch.zeros(len(train), dtype=torch.float32, device=device)
    plan = PassPlan(1, 1, min(train_batch_size, len(train)))  # one row per pass: only micro-batches halve
    undo = _activation_grads_only(model)
    try:
        with scorer.hooks:
            scorer.hooks.callback, scorer.hooks.dtype = scorer._add_self_scores, score_args.per_sample_gradient_dtype

            def one_pass():
                for start, stop, batch in scorer.train_batches(train, train_batch_size, plan.train_micro,
                                                               "fused self-influence", disable_tqdm):
                    scorer.hooks.block = scores[start:stop]
                    scorer._run(batch, measurement=False)

            def shrink(detail):
                scores.zero_()
                plan.shrink("fused self-influence", detail, "free memory on the GPU or lower --max_length")
            retry_on_oom(one_pass, shrink, device)
    finally:
        undo()
    if world > 1:
        dist.all_reduce(scores)
    out = torch.empty_like(scores, device="cpu")
    out[order] = scores.cpu()
    return out

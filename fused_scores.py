"""Pairwise influence scores from kronfluence's fitted factors, with one fused matmul per module.

    python analyze.py --checkpoint_dir checkpoints/swag --use_half_precision --scoring fused

kronfluence fits the factors (covariance, eigendecomposition, lambda) and prepares them (damping, inverse
eigenvalues); EKFAC's query preconditioning is its arithmetic with the odd input width padded (AlignedEkfac), other
strategies use its `FactorConfig` code. The training side differs from its loop:

- one pass over the training set scores a whole chunk of queries with one (queries × params) @
  (params × examples) matmul per module and batch. The preconditioned query gradients that fit in the memory
  available when scoring starts are held at once: every query of a chunk (all 2,000 SWAG queries on an H200),
  for a group of modules, the top layers' first. Each module group is a pass whose backward stops below its
  lowest module; the per-example gradients of a module are formed once, whatever the number of groups. Each pass
  stores, per training micro-batch, the gradient at the output of the encoder layer that holds the next group's
  highest module (host memory, BoundaryGradients): the next pass runs the forward only up to that layer and its
  backward from the stored gradient, so the layers above its modules do not run in it; the query side of each pass
  does the same with the query micro-batches' gradients at that layer, which the query side of the pass before
  stored (every pass runs from the loss for a model without `base_model.encoder.layer`, for a group with a module
  outside those layers, and where the gradients need more than HOST_MEMORY_SHARE of the free host memory). A pass
  thus holds about its own layers' activations (from the loss: those above its lowest module), so a group may hold
  more modules than a whole backward leaves room for (PassPlan.extra; each such group is probed as its pass runs
  before scoring). An out-of-memory error halves the passes' memory and redoes the chunk, keeping the finished
  chunks;
- per-example gradients are formed directly, summed over the four choices inside the matmul
  (kronfluence materialises one gradient per choice, then sums);
- the contraction runs in the score dtype, or with `fp8_contraction` in fp8 e4m3 with a scale per row (fp8.py: the
  query gradients in half the bytes, so in fewer module groups, in torch's one-scale fp8 kernels; the same sums
  within e4m3's rounding, tests/test_fp8.py);
- no parameter gradients: only activation gradients flow backwards;
- batches are sorted by length, longest first, so dynamic padding wastes little and a batch size that
  does not fit fails at once; a training micro-batch of shorter rows holds up to GROWTH times the rows, within the
  tokens of the longest (micro_spans), so the query gradients are read once for more rows; scores return in
  dataset order;
- the training micro-batches of a pass are collated by DataLoader workers into pinned memory while the GPU
  works on the previous ones (the host's collation costs 40-60 ms per 128 rows of real text on one core).

Scores are linear in the training gradient, so this is the same computation as kronfluence's
pairwise scores for the same factors (tests/test_fused.py checks it on CPU). Under
`torch.distributed` each rank scores its share of the training batches and the ranks sum the matrix.
"""

import logging
import math
import mmap
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from kronfluence.factor.config import FactorConfig
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.utils.constants import ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME, LAMBDA_MATRIX_NAME
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import fp8
from fast_kernels import ALIGN
from utils import HookTimes, UserError, available_host_memory, available_memory, out_of_memory_detail, retry_on_oom

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.9  # of the available memory a pass plans to use; the allocator's fragmentation takes the rest
# Training rows per micro-batch below which a smaller micro-batch is not taken to save passes (below this the GPU's
# kernels run far from full width).
MIN_TRAIN_MICRO = 32
# A pass costs a forward and backward over every training row; its contraction reads every query gradient of the
# pass once per training micro-batch. One training row's forward and backward costs about as much as reading this
# many query gradients (benchmark_h200_extrapolated.json, --fast on roberta-base, one H200: 0.821 s a pass of 2,048 rows and
# 0.000881 s a query per pass at 128 rows a micro-batch, so (0.821 / 2048) / (0.000881 / 16) = 7.3).
PASS_ROW_COST = 7.3
# A training micro-batch of shorter rows holds up to this many times the planned rows, within the planned micro-batch's
# tokens (micro_spans): its matmuls read the passes' query gradients once for more rows. Its larger per-example
# gradients take memory from the query gradients, so where the passes are several the plan also weighs no growth
# (fewer_passes).
GROWTH = 4
# One rank's training rows go in units of this many training batches (micro_spans): where the micro-batch divides the
# batch, a whole number of micro-batches of every growth from 1 to GROWTH (a micro-batch never crosses a unit), so that
# few are cut short at a unit's end. Several ranks take turns over units of up to GROWTH batches: longer units would
# give the first ranks, which take the longer rows each round, more of the work.
UNIT_BATCHES = math.lcm(*range(1, GROWTH + 1))
# Of the host memory available (before the factor stages for pin_ahead, when scoring starts otherwise), the share that
# the boundary gradients (BoundaryGradients) may take; where they need more, every pass runs the whole forward and the
# backward from the loss.
HOST_MEMORY_SHARE = 0.5


def row_lengths(dataset) -> np.ndarray:
    """Each row's longest choice in tokens (what dynamic padding pads its batch to), from the Arrow column."""
    column = dataset.with_format("arrow")["input_ids"]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = column.offsets.to_numpy()
    if column.null_count or (np.diff(offsets) == 0).any():
        raise ValueError("a row without choices in input_ids")
    choices = pc.list_value_length(pc.list_flatten(column)).to_numpy(zero_copy_only=False)
    return np.maximum.reduceat(choices, offsets[:-1] - offsets[0]).astype(np.int64)


def longest_first(dataset) -> np.ndarray:
    """Row order by longest choice, longest first: batches hold similar lengths, so dynamic padding wastes little,
    and the batch that needs the most memory comes first, so a size that does not fit fails before work is lost."""
    return order_of(row_lengths(dataset))


def order_of(lengths: np.ndarray) -> np.ndarray:
    """longest_first's order from the rows' lengths (stable: equal lengths keep the dataset's order)."""
    return np.argsort(-lengths, kind="stable")


def micro_spans(lengths: np.ndarray, batch_size: int, micro: int, rank: int = 0, world: int = 1,
                growth: int = None) -> list:
    """(start, stop) of rank `rank`'s training micro-batches over rows of `lengths` tokens, longest first, in units of
    UNIT_BATCHES training batches on one rank. Several ranks take turns over units of up to GROWTH batches, fewer where
    the ranks would otherwise lack a unit each: the same units on every rank whatever its micro-batch and growth (each
    rank plans its own), so that every row is scored once. Inside a unit a micro-batch holds `micro` rows, or up to
    `growth` (default GROWTH) times as many shorter rows within the tokens of the longest micro-batch (`micro` rows of
    the first row's length): the per-example gradients it forms grow with its rows, which working_memory probes
    (train_probes), while each of its matmuls with the query gradients reads them once."""
    growth = GROWTH if growth is None else growth
    if micro < 1 or batch_size < 1 or growth < 1:
        raise ValueError(f"micro-batches of {micro} rows in batches of {batch_size}, growth {growth}: each needs >= 1")
    batches_per_unit = max(1, min(UNIT_BATCHES if world == 1 else GROWTH, math.ceil(len(lengths) / batch_size) // world))
    longest, unit, spans = (int(lengths[0]) if len(lengths) else 0), batch_size * batches_per_unit, []
    for step, start in enumerate(range(0, len(lengths), unit)):
        if step % world != rank:
            continue
        stop, row = min(start + unit, len(lengths)), start
        while row < stop:
            grow = min(growth, max(1, longest // max(int(lengths[row]), 1)))
            spans.append((row, min(row + grow * micro, stop)))
            row = spans[-1][1]
    return spans


def rank_spans(lengths: np.ndarray, batch_size: int, micro: int, growth: int = None) -> list:
    """micro_spans of this process's rank (torch.distributed's, else the only one)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return micro_spans(lengths, batch_size, micro, rank, world, growth)


def query_spans(num_queries: int, micro: int) -> list:
    """(start, stop) of the query micro-batches of a chunk of `num_queries` queries: `micro` queries each."""
    return [(start, min(start + micro, num_queries)) for start in range(0, num_queries, micro)]


def train_probes(lengths: np.ndarray, micro: int, growth: int = None) -> list:
    """(start, stop) of the training micro-batches whose working memory bounds every other's: the first one (the
    longest rows) and the first of each larger size that micro_spans gives shorter rows (at most `growth`, default
    GROWTH, times `micro`)."""
    if not len(lengths):
        return []
    growth = GROWTH if growth is None else growth
    grow = np.minimum(growth, np.maximum(1, int(lengths[0]) // np.maximum(lengths, 1)))  # non-decreasing
    sizes, firsts = np.unique(grow, return_index=True)
    return [(int(row), min(int(row) + int(size) * micro, len(lengths))) for size, row in zip(sizes, firsts)]


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
    """Hooks that hand `callback(name, weight_grad, bias_grad)` each active module's per-example gradient
    during the backward pass: (examples, d_out, d_in) and (examples, d_out) (None without a bias),
    summed over the choices. Weight and bias stay apart so that every matmul keeps aligned shapes
    (a d_in + 1 column falls back to slow GPU kernels).

    The backward starts at the active modules: an active module's input that needs no gradient yet is replaced by
    a copy that does (with frozen parameters nothing else does). A module's output gradient is exact wherever the
    graph starts, since everything computed from the output is in it; and nothing below the lowest active module is
    differentiated, so a pass over the top layers' modules backpropagates through the top layers only."""

    def __init__(self, modules: dict, dtype: torch.dtype):
        self.modules, self.dtype = modules, dtype
        self.active = set(modules)  # the modules of the current pass (a module group)
        self.num_examples, self.callback, self.handles = 0, None, []
        self.block = None  # the (queries × batch) slice of the score matrix being filled
        # with `scaled` (an fp8 contraction's training side): each example's weight gradient divided by its scale in
        # `scales` (fp8.gradient_scales, rounded to the gradient's dtype), so that it lands in e4m3's range
        self.scaled, self.scales = False, None
        self.times = HookTimes()  # where a pass's time goes (fused_pairwise_scores' timings)

    def part(self, name: str, tensor: torch.Tensor):
        """The block timed as `name` in `times`; `tensor`: where its kernels run."""
        return self.times.part(name, tensor.is_cuda)

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._start_backward(name)))
            self.handles.append(module.register_forward_hook(self._forward_hook(name, module.bias is not None)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _start_backward(self, name: str):
        def hook(module, inputs):
            if name in self.active and torch.is_grad_enabled() and not inputs[0].requires_grad:
                return (inputs[0].detach().requires_grad_(), *inputs[1:])
        return hook

    def _forward_hook(self, name: str, has_bias: bool):
        def hook(module, inputs, output):
            if name not in self.active:
                return
            activation = inputs[0].detach()

            def on_grad(grad):
                with self.part("per-example gradients", grad):
                    weight, bias = self.gradient(activation, grad, has_bias)
                self.callback(name, weight, bias)  # returns None: grad unchanged

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def gradient(self, activation, output_grad, has_bias: bool):
        n = self.num_examples
        activation = activation.to(self.dtype).reshape(n, -1, activation.size(-1))  # choices × tokens per example
        output_grad = output_grad.detach().to(self.dtype).reshape(n, -1, output_grad.size(-1))
        bias = output_grad.sum(dim=1) if has_bias else None
        if self.scaled:
            scales = fp8.gradient_scales(output_grad, activation).to(self.dtype)
            output_grad = output_grad / scales[:, None, None]
            self.scales = scales.float()
        weight = torch.bmm(output_grad.transpose(1, 2), activation)
        return weight, bias


def encoder_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The model's stack of encoder layers (`base_model.encoder.layer`: BERT, RoBERTa, MiniLM and the like), or None.
    Each layer's output is the only input of the next one that depends on the rows (the attention mask and position
    terms do not), so the gradient of the loss with respect to it stands for everything above."""
    blocks = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def _hidden(output):
    """A layer's hidden states: its output, or the first element of a tuple (older transformers)."""
    return output[0] if isinstance(output, tuple) else output


class _Stopped(Exception):
    """Raised by the forward hook that ends a pass's forward at a layer's output (FusedScorer.boundaries)."""

    def __init__(self, output: torch.Tensor):
        super().__init__("forward stopped at a layer's output")
        self.output = output


class _Discarded:
    """A stand-in for BoundaryGradients in the memory probes (FusedScorer.working_memory): what it is given is dropped."""

    def store(self, index: int, gradient: torch.Tensor) -> None:
        pass


_RELEASES = []  # the threads of BoundaryGradients.close(wait=False) still unregistering a closed store's blocks
_RELEASES_LOCK = threading.Lock()
_STILL_PINNED = []  # blocks such a thread failed to unregister: kept, so that locked pages are never unmapped


def release_pending() -> None:
    """Wait until every closed store's blocks are unregistered (BoundaryGradients.close(wait=False)): before host
    memory is measured or pinned again."""
    with _RELEASES_LOCK:
        while _RELEASES:
            _RELEASES[0].join()
            _RELEASES.pop(0)


def boundary_host_memory() -> int:
    """utils.available_host_memory once a closed store's blocks are given back (release_pending): what an earlier
    scoring still holds is not in use."""
    release_pending()
    return available_host_memory()


class BoundaryGradients:
    """Between the passes of a chunk, per micro-batch of one side (training or query), the gradient of the loss (or
    the measurement) with respect to one encoder layer's output, in host memory. A module group's pass stores the
    gradient at the output of the layer holding the next group's highest module; the next pass runs the forward up to
    that layer only, and its backward from the stored gradient: the values the backward from the loss reaches there
    (the layers above are the same functions of the same inputs), without the layers above.

    On a GPU the slots are page-locked (the copies take the DMA path and do not hold up the host) and cut from blocks
    of at most BLOCK bytes. The copies run on two streams of their own, to the host and to the GPU, beside the
    passes' kernels (35 GiB each way a pass at SWAG scale): a store waits for the kernels launched before it and
    holds the gradient's memory until its copy is done; a load waits for the slot's last store and, as the pass
    takes it, fetches the next micro-batch's; a slot is stored into only after its load is done (the store follows
    the kernels that waited for the load). cudaHostAlloc faults the pages in while it holds the CUDA driver's lock:
    on an H100 it pins 8 GiB in 2.7 s, while a thread launching matmuls runs at 0.6% of its rate
    (results/pin_probe.py). A thread therefore pins the blocks from the store's creation on (pin_ahead's: before the
    factor stages; boundary_store's: as the first pass starts), each in two steps: it writes the block's pages in a
    mapping of its own (faulting them in, no lock held), then registers them (cudaHostRegister): 8 GiB in 0.85 s,
    the matmuls at 72% of their rate meanwhile. The blocks are those the `slots` (each micro-batch's bytes, in the
    order they are stored) take laid out as `_bytes` lays them out, a slot never straddling two blocks; without
    `slots`, enough for `expected` bytes. A slot waits only for a block not pinned yet (`waited`: the seconds the
    passes waited for pinned memory, from the thread or pinned in place). A slot larger than a block is pinned on its
    own and ends the pinning ahead. The blocks serve the next chunk's slots too (`reset`) and are unregistered by
    `close`. Where pinning fails, the slots are ordinary host memory."""

    BLOCK = 2**30
    ALIGNMENT = 512

    def __init__(self, device: torch.device, expected: int = 0, slots: Optional[list] = None):
        release_pending()  # a closed store's blocks unregistered first: never both on the host
        self.device, self.pin = device, self._pins(device)
        # the GPU the registrations are for: a thread starts on GPU 0 whatever the caller's (torchrun's other ranks)
        self.gpu = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        # the bytes the slots will take (boundary_slots): smaller blocks below BLOCK
        self.expected = expected or sum(slots or ())
        self.slots, self.blocks, self.used, self.held, self.waited = {}, [], 0, 0, 0.0
        # to the host, to the GPU; per slot the event after its last store, and a load fetched ahead
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if device.type == "cuda" else None
        self.stored, self.fetched = {}, {}
        self.spare = []  # the blocks of the chunk before, for this chunk's slots
        self.pinned = []  # every block registered with CUDA (the thread's too), until close() unregisters it
        # the blocks pinned ahead: a queue the thread fills (a block, or the exception that ended pinning), and how
        # many it has yet to hand over
        self.ahead, self.coming, self.stopping, self.thread = queue.Queue(), 0, threading.Event(), None
        if self.pin and self.expected > 0:
            sizes = self._ahead(self.expected, slots)
            self.coming = len(sizes)
            self.thread = threading.Thread(target=self._pin_ahead, args=(sizes,), name="pin boundary blocks",
                                           daemon=True)
            self.thread.start()

    @staticmethod
    def _pins(device: torch.device) -> bool:
        return device.type == "cuda"

    def _block_size(self, nbytes: int) -> int:
        return min(self.BLOCK, 1 << (nbytes - 1).bit_length())  # a power of two: room for the slots' alignment

    def _ahead(self, expected: int, slots: Optional[list]) -> list:
        """The sizes of the blocks to pin ahead: whole blocks (BLOCK, or one power of two below it that holds every
        slot), as many as the `slots` take in `_bytes`'s layout (up to the first slot larger than a block, which ends
        the pinning ahead), or without `slots` enough for `expected` bytes."""
        aligned = [-(-nbytes // self.ALIGNMENT) * self.ALIGNMENT for nbytes in slots or ()]
        total = sum(aligned) if slots is not None else expected
        size = self.BLOCK if total > self.BLOCK else self._block_size(total)
        if slots is None:
            return [size] * -(-expected // size)
        count, used = 0, size
        for nbytes, room in zip(slots, aligned):
            if nbytes > size:
                break
            if used + nbytes > size:
                count, used = count + 1, 0
            used += room
        return [size] * count

    def _pin_ahead(self, sizes: list) -> None:
        started, pinned = time.perf_counter(), 0
        try:
            for size in sizes:
                if self.stopping.is_set():
                    return
                try:
                    block = self._pin_block(size)
                except Exception as exc:  # any: a slot waits for what this thread puts
                    self.ahead.put(exc)
                    return
                self.pinned.append(block)
                self.ahead.put(block)
                pinned += size
        finally:
            self.ahead.put(None)  # the end, however the thread ends: a slot never waits for a block that is not coming
            logger.info("fused scoring: %.1f GiB of host memory pinned ahead in %.1f s", pinned / 2**30,
                        time.perf_counter() - started)

    @staticmethod
    def _allocate(nbytes: int, pin: bool) -> torch.Tensor:
        """`nbytes` of host memory. Pinned: a private mapping of its own that forked processes (DataLoader workers) do
        not inherit (the kernel would copy pinned pages into each child), its pages written (faulted in) first and
        then registered with CUDA."""
        if not pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_DONTFORK)
        block = torch.frombuffer(memory, dtype=torch.uint8)  # holds the mapping while it lives
        block.fill_(0)
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(block.data_ptr(), nbytes, 0))
        return block

    def _pin_block(self, nbytes: int) -> torch.Tensor:
        """A pinned block, from a thread other than the passes' (a new thread starts on GPU 0: this store's GPU)."""
        if self.gpu is not None:
            torch.cuda.set_device(self.gpu)
        return self._allocate(nbytes, pin=True)

    @staticmethod
    def _unpin(block: torch.Tensor) -> None:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(block.data_ptr()))

    def _pinned_here(self, nbytes: int) -> torch.Tensor:
        """_pin_block(nbytes) in a thread of its own: a failed CUDA call leaves its error with the calling thread,
        where the next kernel launch's check would raise it."""
        result = {}

        def pin():
            try:
                result["block"] = self._pin_block(nbytes)
            except Exception as exc:  # any: handed to the caller
                result["error"] = exc
        thread = threading.Thread(target=pin, name="pin a boundary block")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["block"]

    def _unregistered(self, block: torch.Tensor) -> bool:
        """Whether `block` was unregistered; a failure is logged, not raised, so that the other blocks still are."""
        try:
            self._unpin(block)
            return True
        except RuntimeError as exc:
            logger.warning("fused scoring: unregistering a pinned block failed (%s)", str(exc).splitlines()[0])
            return False

    def _release(self, block: torch.Tensor) -> None:
        """A block that holds no slot unregistered (if it was pinned) and dropped; one that fails stays in `pinned`
        (its pages stay locked, close() tries again)."""
        for i, pinned in enumerate(self.pinned):
            if pinned is block:
                if self._unregistered(block):
                    del self.pinned[i]
                return

    def _pinned_ahead(self, nbytes: int) -> Optional[torch.Tensor]:
        """The next block the thread pinned (waiting for it), or None: none to come, or pinning failed."""
        while self.coming:
            started = time.perf_counter()
            block = self.ahead.get()
            self.waited += time.perf_counter() - started
            self.coming -= 1
            if block is None or isinstance(block, Exception):
                self.coming = 0
                if block is not None:
                    self._pinning_failed(block)
            elif block.numel() >= nbytes:
                return block
            else:
                self.spare.append(block)  # too small for this slot, not for a later one
        return None

    def _stop_pinning(self) -> None:
        """No more blocks ahead: the thread stopped, and the blocks it pinned that no slot took released."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        while not self.ahead.empty():  # the thread has ended: nothing more comes
            block = self.ahead.get()
            if isinstance(block, torch.Tensor):
                self._release(block)
        self.coming = 0

    def _pinning_failed(self, exc: Exception) -> None:
        self.pin = False
        logger.info("fused scoring: pinning host memory failed (%s); the layer-output gradients go to ordinary host "
                    "memory", str(exc).splitlines()[0])

    def reset(self) -> None:
        """Before a chunk's first pass: the slots are laid out again (an out-of-memory retry may change the
        micro-batches), in the blocks already there first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy into or out of a slot is pending, on any stream
        self.held = max(self.held, self.nbytes())  # the most a chunk's slots took
        self.spare += self.blocks
        self.slots, self.blocks, self.used, self.stored, self.fetched = {}, [], 0, {}, {}

    def close(self, wait: bool = True) -> None:
        """The host memory back: the pinning thread stopped, the slots and blocks dropped, every pinned block
        unregistered. With `wait=False` the unregistering and unmapping (about 0.5 s per 8 GiB on an H100,
        results/pin_probe.py) go on in a thread of their own beside what the caller does next; a store created later
        first waits for it (release_pending), so that the host never holds both."""
        self._stop_pinning()
        self.reset()
        self.spare = []
        pinned, self.pinned = self.pinned, []
        if wait or not pinned:
            # each on its own: a block that fails stays referenced (its pages stay locked)
            self.pinned = [block for block in pinned if not self._unregistered(block)]
            return

        def release():
            try:
                if self.gpu is not None:  # a new thread starts on GPU 0: the registrations are this store's GPU's
                    torch.cuda.set_device(self.gpu)
                while pinned:  # each dropped once unregistered (its mapping unmapped); one that fails is kept
                    block = pinned.pop(0)
                    if not self._unregistered(block):
                        _STILL_PINNED.append(block)
            finally:
                _STILL_PINNED.extend(pinned)  # what an error left
        thread = threading.Thread(target=release, name="unpin boundary blocks")
        with _RELEASES_LOCK:
            _RELEASES.append(thread)
            thread.start()

    def _empty(self, nbytes: int) -> torch.Tensor:
        if self.pin:
            started = time.perf_counter()
            try:
                block = self._pinned_here(nbytes)
            except Exception as exc:  # any (CUDA's errors, a mapping the host cannot give): ordinary memory instead
                self._pinning_failed(exc)
            else:
                self.pinned.append(block)
                return block
            finally:
                self.waited += time.perf_counter() - started  # pinning in place holds the pass up too
        return self._allocate(nbytes, pin=False)

    def _block(self, nbytes: int) -> torch.Tensor:
        """A block for a slot of `nbytes`: one of the chunk before's, the next one pinned ahead, or a new one."""
        for i, block in enumerate(self.spare):
            if block.numel() >= nbytes:
                return self.spare.pop(i)
        if nbytes > self.BLOCK:
            # a slot of its own: the blocks pinned ahead for the same bytes would never be used (the longest rows come
            # first, so this is the first slot, before the thread has pinned much)
            self._stop_pinning()
            return self._empty(nbytes)
        block = self._pinned_ahead(nbytes)
        if block is None:  # none pinned ahead: one sized to what is still expected
            remaining = self.expected - sum(b.numel() for b in self.blocks)
            block = self._empty(self._block_size(max(nbytes, remaining)))
        return block

    def _bytes(self, nbytes: int) -> torch.Tensor:
        if not self.blocks or self.used + nbytes > self.blocks[-1].numel():
            self.blocks.append(self._block(nbytes))
            self.used = 0
        start, self.used = self.used, self.used + -(-nbytes // self.ALIGNMENT) * self.ALIGNMENT
        return self.blocks[-1][start:start + nbytes]

    def store(self, index: int, gradient: torch.Tensor) -> None:
        slot = self.slots.get(index)
        if slot is None:
            slot = self.slots[index] = self._bytes(gradient.nbytes).view(gradient.dtype).view(gradient.shape)
        elif slot.shape != gradient.shape or slot.dtype != gradient.dtype:
            raise RuntimeError(f"micro-batch {index}: a boundary gradient of {tuple(gradient.shape)} for a "
                               f"slot of {tuple(slot.shape)}")
        if self.streams is None:
            slot.copy_(gradient.detach())
            return
        to_host = self.streams[0]
        to_host.wait_stream(torch.cuda.current_stream(self.device))  # the kernels that computed the gradient
        with torch.cuda.stream(to_host):
            slot.copy_(gradient.detach(), non_blocking=True)
        gradient.record_stream(to_host)  # its memory is not handed out again before the copy is done
        self.stored[index] = to_host.record_event()

    def load(self, index: int) -> torch.Tensor:
        """Micro-batch `index`'s gradient on the device, for the kernels launched next on the current stream (a copy:
        the pass may store into the slot)."""
        if index not in self.slots:
            raise RuntimeError(f"no boundary gradient stored for micro-batch {index}")
        if self.streams is None:
            return self.slots[index].clone()
        gradient, done = self.fetched.pop(index, None) or self._fetch(index)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        gradient.record_stream(compute)
        if index + 1 in self.slots:  # the next micro-batch's, while this one computes
            self.fetched[index + 1] = self._fetch(index + 1)
        return gradient

    def _fetch(self, index: int) -> tuple:
        """(a copy of slot `index` on the device, the event after it), on the stream to the GPU, after the slot's
        last store."""
        to_device = self.streams[1]
        if index in self.stored:
            to_device.wait_event(self.stored[index])
        with torch.cuda.stream(to_device):
            gradient = self.slots[index].to(self.device, non_blocking=True, copy=True)
        return gradient, to_device.record_event()

    def nbytes(self) -> int:
        """The bytes of the slots (boundary_slots's estimate)."""
        return sum(slot.nbytes for slot in self.slots.values())


def layer_output_slots(model: nn.Module, collator, lengths: np.ndarray, spans: list, choices: int) -> Optional[list]:
    """Per micro-batch of `spans` (rows of `lengths` tokens, longest first; `choices` sequences a row), the bytes of one
    encoder layer output's gradient, as the collator pads the rows (to each micro-batch's longest row, or to
    max_length); None for a model without encoder layers (encoder_blocks) or without a hidden_size in its config."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if encoder_blocks(model) is None or not hidden:
        return None
    fixed = getattr(collator, "max_length", None) if getattr(collator, "padding", None) == "max_length" else None
    multiple = getattr(collator, "pad_to_multiple_of", None) or 1
    width = choices * hidden * next(model.parameters()).dtype.itemsize
    return [(stop - start) * (fixed or -(-int(lengths[start]) // multiple) * multiple) * width for start, stop in spans]


def pin_ahead(model: nn.Module, collator, train_dataset, query_dataset, train_batch_size: int,
              query_batch_size: int, score_dtype: torch.dtype, device: torch.device,
              fp8_contraction: bool = False) -> Optional[tuple]:
    """The training and the query sides' BoundaryGradients for a later fused_pairwise_scores (its `boundary_memory`),
    their threads pinning the host memory from now on, beside other work (analyze.py: the factor stages); None where
    the passes would not need them or they should not be taken now: off a GPU, for a model without encoder layers,
    where the queries' gradients fit in the GPU's free memory now (a rougher test than plan_passes': some runs of
    several module groups pin as their first pass stores), or where the gradients need more than HOST_MEMORY_SHARE of
    the host memory available. Laid out for the plan's first choice of micro-batches (`train_batch_size` training rows
    with GROWTH, `query_batch_size` queries, every query in one chunk); a plan with others pins what it needs beyond
    that as it stores, and what it does not need stays pinned until the scores end."""
    if device.type != "cuda" or not len(train_dataset) or not len(query_dataset):
        return None
    modules = tracked_linears(model, linear_module_names(model))
    gradients = len(query_dataset) * sum(query_gradient_bytes(modules, score_dtype, fp8_contraction).values())
    room = available_memory(device)
    if room is None or gradients <= room:
        return None
    # longest first, as sorted_rows orders the rows
    train_lengths, query_lengths = (-np.sort(-row_lengths(rows)) for rows in (train_dataset, query_dataset))
    train_spans = rank_spans(train_lengths, train_batch_size, min(train_batch_size, len(train_lengths)))
    queries_spans = query_spans(len(query_lengths), min(query_batch_size, len(query_lengths)))
    sides = [layer_output_slots(model, collator, train_lengths, train_spans, len(train_dataset[0]["input_ids"])),
             layer_output_slots(model, collator, query_lengths, queries_spans, len(query_dataset[0]["input_ids"]))]
    if None in sides or sum(map(sum, sides)) > HOST_MEMORY_SHARE * boundary_host_memory():
        return None
    logger.info("fused scoring: pinning %.1f GiB of host memory for the layer-output gradients ahead",
                sum(map(sum, sides)) / 2**30)
    return new_stores(device, sides)


def new_stores(device: torch.device, sides: list) -> tuple:
    """A BoundaryGradients for each side's `slots`, made one at a time: a store whose thread started is closed if the
    next one fails."""
    stores = []
    try:
        for slots in sides:
            stores.append(BoundaryGradients(device, slots=slots))
    except BaseException:
        close_all(stores)
        raise
    return tuple(stores)


def close_all(stores, wait: bool = True) -> None:
    """Close each BoundaryGradients of `stores` (None skipped, each once; `wait`: see BoundaryGradients.close),
    whatever the others' close raises (a sticky CUDA error in its synchronize); the first error is raised after the
    rest are closed."""
    error, closed = None, set()
    for store in stores:
        if store is None or id(store) in closed:
            continue
        closed.add(id(store))
        try:
            store.close(wait)
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


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


def _backward(model, task, batch, device, amp_dtype, measurement: bool, boundary: torch.Tensor = None):
    """The loss's (or the measurement's) backward over `batch`; with a `boundary` gradient, the backward of the output
    at which a forward hook stopped the forward (FusedScorer.boundaries), from that gradient (or from
    `boundary(output)` where it is a callable: the memory probes' zeros)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    try:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = task.compute_measurement(batch, model) if measurement else task.compute_train_loss(batch, model,
                                                                                                   sample=False)
    except _Stopped as stopped:
        if boundary is None:
            raise
        loss = stopped.output  # the backward runs outside the except block, whose traceback holds the forward's frames
    else:
        if boundary is not None:
            raise RuntimeError("the forward did not stop at the boundary layer")
    loss.backward(boundary(loss) if callable(boundary) else boundary)  # None: the scalar loss's own


def _frozen(model: nn.Module):
    """Freeze the parameters (only activation gradients flow: PerExampleGradients starts the backward at the pass's
    modules) and run kronfluence's wrappers as their original modules; returns an undo. A wrapper adds a float32
    constant to an output that needs no gradient, so that kronfluence's own backward reaches it: below a pass's
    modules that would cost a kernel per module and turn bf16 outputs into float32 ones, which the modules above
    would then see in place of the bf16 values one pass over every module sees."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    wrappers = [m for m in model.modules() if isinstance(m, TrackedModule)]
    for wrapper in wrappers:
        # a bound method (a module would be registered as a submodule named "forward"), as an instance attribute:
        # nn.Module.__call__ finds it before the class's forward; hooks on the original module still run
        wrapper.forward = wrapper.original_module.__call__

    def undo():
        for p, flag in flags:
            p.requires_grad_(flag)
        for wrapper in wrappers:
            del wrapper.forward
    return undo


def query_gradient_bytes(modules: dict, dtype: torch.dtype, fp8_rows: bool = False) -> dict:
    """Per module, the bytes of one preconditioned query gradient: a copy of its weight (and bias) in `dtype`; with
    `fp8_rows`, the weight's in e4m3 and its float32 scale (FusedScorer's fp8 contraction), the bias's in `dtype`."""
    def weight(m):
        return fp8.aligned(m.out_features * m.in_features) if fp8_rows else m.out_features * m.in_features * dtype.itemsize
    return {name: weight(m) + (m.bias is not None) * m.out_features * dtype.itemsize + fp8_rows * 4
            for name, m in modules.items()}


def module_groups(order: list, sizes: dict, budget: Optional[int], extra: Optional[dict] = None) -> list:
    """`order` (module names in the order the backward reaches them) cut into contiguous groups whose `sizes` add
    up to at most `budget`, plus `extra[m]` bytes for a group whose lowest module is m (a module larger than that
    goes alone): as few groups as packing each one full from the top gives, their sizes evened out. One group when
    `budget` is None."""
    extra = extra or {}

    def pack(cap):
        groups, used = [[]], 0
        for name in order:
            if groups[-1] and used + sizes[name] > min(cap, budget + extra.get(name, 0)):
                groups, used = groups + [[]], 0
            groups[-1].append(name)
            used += sizes[name]
        return groups

    total = sum(sizes[name] for name in order)
    if budget is None or total <= budget + extra.get(order[-1], 0):
        return [list(order)]
    fewest = pack(math.inf)
    even = pack(math.ceil(total / len(fewest)))
    return even if len(even) == len(fewest) else fewest


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
    """How one rank splits the work: the queries of a chunk, the module groups a chunk is scored in (one pass over
    the training rows per group, the queries' gradients of the group's modules held at once), and the rows of each
    forward/backward (micro-batches of the query and training batches; ranks share units of training batches,
    micro_spans)."""
    per_pass: int  # queries per chunk
    query_micro: int
    train_micro: int
    budget: Optional[int] = None  # bytes of query gradients one pass may hold (None: no limit, one group)
    capacity: Optional[int] = None  # queries whose gradients for every module fit in the budget (None: no limit)
    chunk_capacity: Optional[int] = None  # queries whose gradients for the largest module fit (None: no limit)
    order: list = field(default_factory=list)  # module names in the order the backward reaches them
    sizes: dict = field(default_factory=dict)  # module name -> bytes of one query's preconditioned gradient
    # module name -> bytes a pass whose lowest module it is may hold beyond `budget`: a pass backpropagates down to its
    # lowest module only, so the higher that is, the less working memory it needs than `budget` leaves for (with
    # `boundaries`, the fewer layers it spans)
    extra: dict = field(default_factory=dict)
    # the passes after a chunk's first run from the gradients the pass before kept (boundaries): a pass's forward stops
    # at its highest layer too, so it holds about its own layers' activations, and `extra` is probed that way
    boundaries: bool = False
    running: Optional[tuple] = None  # (queries, module group) of the pass under way: the one an out-of-memory error hit
    side: Optional[str] = None  # "query" or "train": the side of the pass under way
    retries: int = 0
    growth: int = GROWTH  # micro_spans' growth of the training micro-batches of shorter rows

    def groups(self, queries: int) -> list:
        """The module groups of a chunk of `queries` queries, in backward order (the top layers' first)."""
        return module_groups(self.order, {name: queries * size for name, size in self.sizes.items()}, self.budget,
                             self.extra)

    def shrink(self, stage: str, detail: str, flag_hint: str) -> None:
        """After an out-of-memory error: first, if the failed pass held more than the budget, no extra room for
        the higher groups (every pass within the budget that the full backward's working memory leaves); else,
        on the training side, no larger micro-batches of shorter rows (which costs no passes); else at most half
        the bytes of the largest pass in each pass, by more module groups where the largest passes hold several
        modules (and the failed one did), else by half the queries; then the training micro-batch, then the
        query one."""
        if any(self.extra.values()):
            failed = self.running and self.running[0] * sum(self.sizes[name] for name in self.running[1])
            self.extra = {}
            if not failed or failed > self.budget:
                self.retries += 1
                logger.warning("%s: out of GPU memory (%s); retrying in %d module groups, each within the full "
                               "backward's budget", stage, detail, len(self.groups(self.per_pass)))
                return
        if self.growth > 1 and self.side == "train":
            self.drop_growth(stage, detail)
            return
        groups = self.groups(self.per_pass)
        pass_bytes = [sum(self.per_pass * self.sizes[name] for name in group) for group in groups]
        largest = max(pass_bytes)
        alone = self.running is not None and len(self.running[1]) == 1  # more groups cannot shrink the failed pass
        if not alone and all(len(group) > 1 for group, size in zip(groups, pass_bytes) if size == largest):
            self.budget, self.retries = largest // 2, self.retries + 1
            logger.warning("%s: out of GPU memory (%s); retrying in %d module groups", stage, detail,
                           len(self.groups(self.per_pass)))
            return
        self._halve_first(["per_pass", "train_micro", "query_micro"], stage, detail, flag_hint, largest)

    def drop_growth(self, stage: str, detail: str) -> None:
        """After an out-of-memory error: training micro-batches of the planned rows only, shorter rows too."""
        self.growth, self.retries = 1, self.retries + 1
        logger.warning("%s: out of GPU memory (%s); retrying without larger micro-batches of shorter rows", stage, detail)

    def halve_micro(self, side: str, stage: str, detail: str, flag_hint: str) -> None:
        """A micro-batch does not fit beside any query gradient: halve the `side` one ("query" or "train": the side
        that ran out of memory, or needs the more), else the other."""
        names = ["query_micro", "train_micro"] if side == "query" else ["train_micro", "query_micro"]
        self._halve_first(names, stage, detail, flag_hint)

    def _halve_first(self, names: list, stage: str, detail: str, flag_hint: str, largest: int = 0) -> None:
        """Halve the first of `names` above 1 (after halving per_pass, the passes stay within half the `largest`
        pass's bytes, which failed), or stop in one line."""
        what = {"per_pass": "queries per pass", "train_micro": "training rows per micro-batch",
                "query_micro": "queries per micro-batch"}
        for name in names:
            size = getattr(self, name)
            if size > 1:
                setattr(self, name, size // 2)
                if name == "per_pass":
                    self.budget = largest // 2
                self.retries += 1
                logger.warning("%s: out of GPU memory (%s); retrying with %d %s", stage, detail, size // 2, what[name])
                return
        single = "per pass and one row per batch" if "per_pass" in names else "and one training row per micro-batch"
        raise UserError(f"{stage}: out of GPU memory with one query {single} ({detail}); {flag_hint}")


class FusedScorer:
    """The per-module state of the fused pass: tracked modules, prepared factors, hooks, query gradients."""

    def __init__(self, model, task, factors: dict, strategy: str, score_args, collator, device: torch.device,
                 num_workers: int = 0, precondition=None, query_weights: dict = None, train_weights: dict = None,
                 fp8_contraction: bool = False):
        names = sorted(next(iter(factors.values()))) if factors else linear_module_names(model)
        self.model, self.task, self.collator, self.device, self.score_args = model, task, collator, device, score_args
        self.num_workers = num_workers
        self.fp8 = fp8_contraction  # the contraction in e4m3 with row scales (fp8.py), else in the score dtype
        self.modules = tracked_linears(model, names)
        if precondition is None:  # the strategy's preconditioning, from kronfluence's prepared factors
            storages = prepared_storages(factors, strategy, names, score_args, device)
            config = FactorConfig.CONFIGS[strategy]
            precondition = AlignedEkfac(storages) if strategy == "ekfac" else (
                lambda name, gradient: config.precondition_gradient(gradient=gradient, storage=storages[name]))
        self.precondition = precondition
        # the query side's weights, when they are not the training side's (source.py: the analysed model's queries
        # against an earlier checkpoint's training gradients)
        self.query_weights = query_weights
        if query_weights is not None and train_weights is None:
            train_weights = {name: p.detach().clone() for name, p in model_weights(model).items()}
        self.train_weights = train_weights  # what the model holds, put back after each pass's query side
        self.hooks = PerExampleGradients(self.modules, score_args.per_sample_gradient_dtype)
        self.probing = "train"  # working_memory's side: "query" or "train"
        # per module: preconditioned (weight, bias) rows of the current pass, and with fp8 the weight rows' scales
        self.query_grads, self.filled = {}, {}
        self._lengths = {}  # dataset fingerprint -> row_lengths
        self.blocks = encoder_blocks(model)
        held_by = {id(m): i for i, block in enumerate(self.blocks or []) for m in block.modules()}
        self.block_of = {name: held_by.get(id(m)) for name, m in self.modules.items()}  # None: outside the layers
        self.micro_batch = 0  # the index of the micro-batch under way on a pass's side
        self.probes = 0  # working_memory's probes (on a GPU)

    def _precondition(self, name, weight, bias):
        gradient = with_bias_column(weight, bias).to(self.score_args.precondition_dtype)
        return self.precondition(name, gradient).to(self.score_args.score_dtype)

    @staticmethod
    def _weight_rows(gradient, weight):
        """A preconditioned query gradient's weight part (the bias column dropped), one row per query."""
        return gradient[..., :weight.size(-1)].flatten(1)

    def _probe_query(self, name, weight, bias):
        """The query side's work in the memory probes: the preconditioning, and the e4m3 rounding's temporaries."""
        gradient = self._precondition(name, weight, bias)
        if self.fp8:
            fp8.scaled_rows(self._weight_rows(gradient, weight),
                            torch.empty(gradient.size(0), weight[0].numel(), dtype=fp8.E4M3, device=weight.device))

    def _keep_query(self, name, weight, bias):
        with self.hooks.part("query preconditioning", weight):
            gradient = self._precondition(name, weight, bias)
            w, b, scales = self.query_grads[name]
            rows = slice(self.filled[name], self.filled[name] + gradient.size(0))
            if self.fp8:
                scales[rows] = fp8.scaled_rows(self._weight_rows(gradient, weight), w[rows, :weight[0].numel()])
            else:
                w[rows] = self._weight_rows(gradient, weight)
            if b is not None:
                b[rows] = gradient[..., -1]
            self.filled[name] = rows.stop

    def _train_rows(self, weight) -> torch.Tensor:
        """An fp8 contraction's training side: the scaled per-example gradients (hooks.scaled) rounded to e4m3, rows
        and width padded with zeros to fp8.aligned."""
        n, width = weight.size(0), weight[0].numel()
        rows = torch.empty(fp8.aligned(n), fp8.aligned(width), dtype=fp8.E4M3, device=weight.device)
        rows[n:].zero_()
        rows[:, width:].zero_()
        rows[:n, :width].copy_(weight.flatten(1))  # in range by the scales' bound: no scaling pass
        return rows

    def _add_scores(self, name, weight, bias):
        with self.hooks.part("contraction", weight):
            w, b, scales = self.query_grads[name]
            if self.fp8:
                n, queries = weight.size(0), self.hooks.block.size(0)
                train_scales = F.pad(self.hooks.scales, (0, fp8.aligned(n) - n), value=1.0)
                block = fp8.product(w, scales, self._train_rows(weight), train_scales)[:queries, :n].float()
            else:
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

    def _backward(self, rows, measurement: bool, boundary: torch.Tensor = None):
        """One forward/backward over `rows`, the hooks handing each module's per-example gradients on; with a
        `boundary` gradient, from it (boundaries)."""
        for batch in DataLoader(rows, batch_size=len(rows), collate_fn=self.collator):
            self._run(batch, measurement, boundary)

    def backward_order(self, queries) -> list:
        """The tracked modules in the order the backward reaches them (recorded on one query; a module the loss does
        not reach comes last)."""
        order = []
        self.hooks.active, self.hooks.dtype = set(self.modules), self.score_args.per_sample_gradient_dtype
        self.hooks.callback = lambda name, *_: order.append(name)
        self._backward(queries.select(range(1)), measurement=True)
        return order + sorted(set(self.modules) - set(order))

    def _run(self, batch: dict, measurement: bool, boundary: torch.Tensor = None):
        self.hooks.num_examples = batch["labels"].size(0)
        _backward(self.model, self.task, batch, self.device, self.score_args.amp_dtype, measurement, boundary)

    def cuts(self, groups: list) -> list:
        """Per module group (in backward order), the encoder layer whose output's gradient, stored by the pass
        before, starts the group's backward (BoundaryGradients), or None: the whole forward and the backward from the
        loss. The first group of a chunk, and a group with a module outside the layers, take the loss's; a later group
        starts at the layer holding its highest module, where the pass before reaches that layer's output (at or below
        its own start)."""
        tops = []
        for k, group in enumerate(groups):
            layers = [self.block_of.get(name) for name in group]
            top = None if k == 0 or None in layers else max(layers)
            if top is not None and tops[-1] is not None and top > tops[-1]:
                top = None
            tops.append(top)
        return tops

    def boundary_slots(self, train, plan: PassPlan, train_batch_size: int) -> Optional[list]:
        """Per training micro-batch of `plan`, the host bytes of one layer output's gradient (layer_output_slots); None
        where the model does not say its width."""
        spans = self.spans(train, train_batch_size, plan.train_micro, plan.growth) if len(train) else []
        return self.span_slots(train, spans)

    def query_boundary_slots(self, chunk, plan: PassPlan) -> Optional[list]:
        """boundary_slots for the query micro-batches of a chunk of queries (longest first)."""
        return self.span_slots(chunk, query_spans(len(chunk), plan.query_micro))

    def span_slots(self, rows, spans: list) -> Optional[list]:
        """layer_output_slots of the micro-batches `spans` of `rows` (longest first)."""
        lengths, choices = (self.lengths(rows), len(rows[0]["input_ids"])) if len(rows) else (np.zeros(0), 0)
        return layer_output_slots(self.model, self.collator, lengths, spans, choices)

    @contextmanager
    def boundaries(self, top: Optional[int], capture: Optional[int], store: Optional[BoundaryGradients]):
        """Hooks for a pass's query or training side: the forward stops at layer `top`'s output (for a backward from a
        stored gradient), and the gradient at layer `capture`'s output is stored for the micro-batch under way (the output
        detached where nothing below needs a gradient, so that the backward stops there)."""
        handles = []

        def stop(module, inputs, output):
            raise _Stopped(_hidden(output))

        def keep(module, inputs, output):
            if not torch.is_grad_enabled():
                return None
            hidden = _hidden(output)
            if not hidden.requires_grad:
                # a view of the leaf, not the leaf: autocast caches its casts of a leaf that requires a gradient, and
                # the layers above would then sum their low-precision gradients before the cast back (one cast for
                # all), not after it as with the outputs of a pass from below
                hidden = hidden.detach().requires_grad_().view_as(hidden)
                output = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            index = self.micro_batch

            def stored(gradient):
                with self.hooks.part("boundary stores", gradient):
                    store.store(index, gradient)
            hidden.register_hook(stored)
            return output

        try:
            if capture is not None:
                handles.append(self.blocks[capture].register_forward_hook(keep))
            if top is not None:
                handles.append(self.blocks[top].register_forward_hook(stop))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def sorted_rows(self, dataset) -> tuple:
        """(`dataset` longest first, the order): training rows as the passes take them, their lengths kept."""
        lengths = row_lengths(dataset)
        order = order_of(lengths)
        rows = dataset.select(order)
        self._lengths[rows._fingerprint] = lengths[order]
        return rows, order

    def lengths(self, rows) -> np.ndarray:
        """row_lengths of `rows` (sorted longest first), kept by the dataset's fingerprint: every pass and probe asks."""
        if rows._fingerprint not in self._lengths:
            self._lengths[rows._fingerprint] = row_lengths(rows)
        return self._lengths[rows._fingerprint]

    def spans(self, train, train_batch_size: int, train_micro: int, growth: int = None) -> list:
        """rank_spans over `train` (sorted longest first)."""
        return rank_spans(self.lengths(train), train_batch_size, train_micro, growth)

    def train_batches(self, train, train_batch_size: int, train_micro: int, desc: str, disable_tqdm: bool,
                      growth: int = None):
        """(start, stop, collated batch) for this rank's training micro-batches (micro_spans, with `growth`), in
        order; DataLoader workers collate ahead into pinned memory."""
        spans = self.spans(train, train_batch_size, train_micro, growth)
        loader = DataLoader(train, batch_sampler=[range(a, b) for a, b in spans], collate_fn=self.collator,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        rank = dist.get_rank() if dist.is_initialized() else 0
        batches = tqdm(loader, desc=desc, total=len(spans), disable=disable_tqdm or rank != 0)
        for batch, (start, stop) in zip(batches, spans):  # the loader first: its bar closes when it ends
            yield start, stop, batch

    def working_memory(self, queries, train, plan: PassPlan, active=None, cut: Optional[tuple] = None) -> int:
        """Peak bytes above the current allocation that the first (longest) query micro-batch and the training
        micro-batches of train_probes need in a pass over the modules `active` (default: all), preconditioning
        included; `cut`: see probe_runs. 0 on CPU."""
        if self.device.type != "cuda":
            return 0
        self.probes += 1
        peaks, base, side = {}, torch.cuda.memory_allocated(self.device), None

        def mark(next_side: Optional[str]) -> None:
            nonlocal side
            if side is not None:
                peaks[side] = torch.cuda.max_memory_allocated(self.device) - base
            torch.cuda.reset_peak_memory_stats(self.device)
            side = next_side
        self.probe_runs(queries, train, plan, active, cut, mark)
        self.probing = "query" if peaks["query"] > peaks["train"] else "train"  # the larger, if none fails
        return max(peaks.values())

    def probe_runs(self, queries, train, plan: PassPlan, active=None, cut: Optional[tuple] = None,
                   mark=lambda side: None) -> None:
        """The runs working_memory measures: the first (longest) query micro-batch's backward, then the training
        micro-batches of train_probes, over the modules `active` (default: all), `mark(side)` called before each
        side's ("query", "train") and after the last (None). With `cut` (top, capture), the pass as `boundaries` runs
        it: the forward up to layer `top`'s output and the backward from zeros there (top None: the whole forward, from
        the loss), the gradient at layer `capture`'s output taken as for the next pass (None: none)."""
        top, capture = cut or (None, None)
        start_at = torch.zeros_like if top is not None else None
        self.hooks.active = set(self.modules if active is None else active)
        try:
            with self.boundaries(top, capture, _Discarded()):
                mark("query")
                self.probing = "query"  # the side a probe that runs out of memory was on (plan_passes halves its micro-batch)
                self.hooks.callback, self.hooks.dtype = self._probe_query, self.score_args.per_sample_gradient_dtype
                self._backward(queries.select(range(min(plan.query_micro, len(queries)))), measurement=True,
                               boundary=start_at)
                mark("train")
                self.probing = "train"
                self.hooks.callback, self.hooks.dtype = (lambda *_: None), self.score_args.score_dtype
                if self.fp8:  # the e4m3 copy of each module's per-example gradients: the contraction's own memory
                    self.hooks.callback, self.hooks.scaled = (lambda name, weight, bias: self._train_rows(weight)), True
                for start, stop in train_probes(self.lengths(train), plan.train_micro, plan.growth):
                    self._backward(train.select(range(start, stop)), measurement=False, boundary=start_at)
                mark(None)
        finally:
            self.hooks.active, self.hooks.scaled = set(self.modules), False

    def _kept(self, top: Optional[int], store: Optional[BoundaryGradients], index: int, like: torch.Tensor):
        """The gradient `store` kept for micro-batch `index` (a "boundary loads" part; `like`: a tensor on the device),
        or None where the side runs from the loss or the measurement (`top` None)."""
        if top is None:
            return None
        with self.hooks.part("boundary loads", like):
            return store.load(index)

    def score_pass(self, chunk, group: list, train, block: torch.Tensor, plan: PassPlan, train_batch_size: int,
                   desc: str, disable_tqdm: bool, top: Optional[int] = None, capture: Optional[int] = None,
                   store: Optional[BoundaryGradients] = None, query_store: Optional[BoundaryGradients] = None) -> tuple:
        """Scores of the queries `chunk` against every training row of this rank through the modules `group`, added
        into `block` (chunk × train); returns the seconds of the query side and of the training side. The training
        side's backward starts from `store`'s gradients at layer `top`'s output (None: from the loss), and stores
        the gradients at layer `capture`'s output (None: none) for the next pass (`boundaries`); the query side's
        likewise from and into `query_store`'s (None: every query side from the measurement)."""
        clock = _Clock(self.device)
        self.query_grads.clear()
        # the fp8 product's padding (zeros): at most ROWS_ALIGN - 1 rows beyond the plan's, inside MEMORY_HEADROOM
        rows = fp8.aligned(len(chunk)) if self.fp8 else len(chunk)
        for name in group:
            m = self.modules[name]
            width = m.out_features * m.in_features
            self.query_grads[name] = (
                torch.zeros(rows, fp8.aligned(width), dtype=fp8.E4M3, device=self.device) if self.fp8 else
                torch.empty(rows, width, dtype=self.score_args.score_dtype, device=self.device),
                torch.empty(len(chunk), m.out_features, dtype=self.score_args.score_dtype, device=self.device)
                if m.bias is not None else None,
                torch.ones(rows, device=self.device) if self.fp8 else None)
            self.filled[name] = 0
        self.hooks.active = set(group)
        try:
            # kronfluence: the query side in the per-sample gradient dtype, the training side in the score dtype
            plan.side = "query"
            self.hooks.callback, self.hooks.dtype = self._keep_query, self.score_args.per_sample_gradient_dtype
            if self.query_weights is not None:
                load_weights(self.model, self.query_weights)
            try:
                query_top = top if query_store is not None else None
                with self.boundaries(query_top, capture if query_store is not None else None, query_store):
                    for i, (start, stop) in enumerate(query_spans(len(chunk), plan.query_micro)):
                        self.micro_batch = i
                        with self.hooks.part("query micro-batches", block):
                            self._backward(chunk.select(range(start, stop)), measurement=True,
                                           boundary=self._kept(query_top, query_store, i, block))
            finally:
                if self.query_weights is not None:
                    load_weights(self.model, self.train_weights)
            if any(self.filled[name] != len(chunk) for name in group):
                raise RuntimeError(f"query gradients reached {sorted({self.filled[n] for n in group})} of "
                                   f"{len(chunk)} rows")
            query_seconds = clock.lap()
            self.hooks.callback, self.hooks.dtype, plan.side = self._add_scores, self.score_args.score_dtype, "train"
            self.hooks.scaled = self.fp8
            with self.boundaries(top, capture, store):
                for i, (start, stop, batch) in enumerate(self.train_batches(train, train_batch_size, plan.train_micro,
                                                                            desc, disable_tqdm, plan.growth)):
                    self.hooks.block, self.micro_batch = block[:, start:stop], i
                    with self.hooks.part("training micro-batches", block):
                        self._run(batch, measurement=False, boundary=self._kept(top, store, i, block))
        finally:  # also after an error: the query gradients freed, and every module's hooks on for what comes next
            self.query_grads.clear()
            self.hooks.active, self.hooks.scaled = set(self.modules), False
        return query_seconds, clock.lap()


class AlignedEkfac:
    """kronfluence's EKFAC preconditioning of a query gradient G (d_out × d_in, the bias as the last input column),
    Q_g ((Q_gᵀ G Q_a) ⊙ Λ⁻¹) Q_aᵀ, from its prepared factors (the inverse Λ⁻¹ includes the damping), with the input
    width zero-padded to a multiple of fast_kernels.ALIGN: the padded columns stay zero through every product, so the
    sums are the same, in aligned GPU kernels (a d_in + 1 width falls back to kernels several times slower)."""

    def __init__(self, storages: dict):
        self.factors = {}
        for name, storage in storages.items():
            q_a = storage[ACTIVATION_EIGENVECTORS_NAME]
            width = q_a.size(0)
            pad = -width % ALIGN
            self.factors[name] = (F.pad(q_a, (0, pad, 0, pad)), storage[GRADIENT_EIGENVECTORS_NAME],
                                  F.pad(storage[LAMBDA_MATRIX_NAME], (0, pad)), width)

    def __call__(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        q_a, q_g, inverse_lambda, width = self.factors[name]
        rotated = q_g.t() @ (F.pad(gradient, (0, q_a.size(0) - width)) @ q_a)
        rotated.mul_(inverse_lambda)
        return (q_g @ (rotated @ q_a.t()))[..., :width]


def plan_passes(scorer: FusedScorer, queries, train, query_batch_size: int, train_batch_size: int,
                max_queries_per_pass: int = 0, plan_queries: int = 0, probe_rows: tuple = None,
                boundaries: bool = False) -> PassPlan:
    """The passes from the memory available now: what is left after the longest micro-batches' working memory, in
    MEMORY_HEADROOM of it, is the budget of one pass's query gradients. A chunk holds as many queries as the largest
    module's gradients fit for (all of them on most GPUs) and is scored in as few module groups as the budget allows.
    A micro-batch that does not fit at all is halved first. `plan_queries`: see with_budget. `probe_rows`: (queries,
    training rows), longest first, whose first micro-batches the memory probes run instead of the scored ones'.
    `boundaries`: the passes after a chunk's first will run from the gradients the pass before kept (PassPlan)."""
    pq, pt = probe_rows or (queries, train)
    hint = "free memory on the GPU (other jobs, a larger --max_memory_gb) or lower --max_length"
    try:
        order = scorer.backward_order(queries)
    except Exception as exc:
        if not should_reduce_batch_size(exc):
            raise
        raise UserError(f"fused scores: out of GPU memory in one query's backward "
                        f"({out_of_memory_detail(exc, scorer.device)}); {hint}") from None
    plan = PassPlan(len(queries), min(query_batch_size, len(queries)), min(train_batch_size, len(train)),
                    order=order, sizes=query_gradient_bytes(scorer.modules, scorer.score_args.score_dtype, scorer.fp8),
                    growth=GROWTH, boundaries=boundaries)
    if max_queries_per_pass:
        plan.per_pass = min(max_queries_per_pass, len(queries))
        return plan
    while True:
        clear_device_cache(garbage_collection=True)
        room = available_memory(scorer.device)
        if room is None:  # CPU: every query in one pass
            return plan
        try:
            working = scorer.working_memory(pq, pt, plan)
        except Exception as exc:
            if not should_reduce_batch_size(exc):
                raise
            detail = out_of_memory_detail(exc, scorer.device)
        else:
            budgeted = with_budget(plan, int(room * MEMORY_HEADROOM - working), len(queries), plan_queries)
            if budgeted.per_pass >= 1:
                budgeted = with_room_above(scorer, pq, pt, budgeted, working, plan_queries)
                logger.info("fused scoring: %.1f GiB available, %.1f GiB per micro-batch of %d training rows, %.2f "
                            "GiB per query gradient: %d queries per chunk in %d module groups", room / 2**30,
                            working / 2**30, plan.train_micro, sum(plan.sizes.values()) / 2**30, budgeted.per_pass,
                            len(budgeted.groups(budgeted.per_pass)))
                chosen = fewer_passes(scorer, pq, pt, budgeted, room, len(queries), plan_queries)
                if chosen is not budgeted:
                    logger.info("fused scoring: %d training rows per micro-batch%s instead, %d queries per chunk in %d "
                                "module groups", chosen.train_micro, "" if chosen.growth > 1 else
                                " (none larger for shorter rows)", chosen.per_pass, len(chosen.groups(chosen.per_pass)))
                checked = checked_room_above(scorer, pq, pt, chosen, room, len(queries), plan_queries)
                if any(checked.extra.values()):
                    logger.info("fused scoring: %d module groups a chunk, %s; each probed)",
                                len(checked.groups(checked.per_pass)),
                                "holding more than a whole backward leaves room for (a pass holds about its own "
                                "layers' activations" if checked.boundaries else
                                "the higher ones holding more (their backward stops higher")
                return checked
            detail = (f"a pass needs {(working + max(plan.sizes.values())) / 2**30:.1f} GiB, "
                      f"{room / 2**30:.1f} GiB available")
        if scorer.probing == "train" and plan.growth > 1:  # the grown micro-batches first
            plan.drop_growth("fused scores", detail)
        else:
            plan.halve_micro(scorer.probing, "fused scores", detail, hint)


def with_budget(plan: PassPlan, budget: int, num_queries: int, plan_queries: int = 0) -> PassPlan:
    """`plan` with `budget` bytes for a pass's query gradients: as many queries per chunk as the largest module
    holds (`chunk_capacity`; 0: not one), and the queries whose gradients for every module fit (`capacity`). With
    `plan_queries` above `num_queries` (benchmark.py's subsets), the module groups are those of a chunk of the
    larger run: its budget is scaled down to this chunk's queries."""
    budget = max(budget, 0)
    chunk_capacity = budget // max(plan.sizes.values())
    capacity = budget // sum(plan.sizes.values())
    full_chunk = min(max(num_queries, plan_queries), chunk_capacity)
    per_pass = min(num_queries, chunk_capacity)
    if full_chunk > per_pass:
        budget = budget * per_pass // full_chunk
    return replace(plan, budget=budget, per_pass=per_pass, chunk_capacity=chunk_capacity, capacity=capacity)


def _budget_scale(plan: PassPlan, plan_queries: int) -> float:
    """The factor with_budget scaled the budget by (below 1 for a subset planned as a chunk of `plan_queries`)."""
    if not plan_queries or not plan.chunk_capacity:
        return 1.0
    full_chunk = min(plan_queries, plan.chunk_capacity)
    return plan.per_pass / full_chunk if full_chunk > plan.per_pass else 1.0


def _probe(scorer: "FusedScorer", queries, train, plan: PassPlan, active, cut: Optional[tuple] = None) -> Optional[int]:
    """The working memory of a pass over the modules `active` (with `cut`: see FusedScorer.working_memory), or None
    where the probe runs out of memory."""
    try:
        return scorer.working_memory(queries, train, plan, active=active, cut=cut)
    except Exception as exc:
        if not should_reduce_batch_size(exc):
            raise
    clear_device_cache(garbage_collection=True)  # outside the except block, which holds the failed probe's tensors
    return None


def with_room_above(scorer: "FusedScorer", queries, train, plan: PassPlan, working: int,
                    plan_queries: int = 0) -> PassPlan:
    """`plan` with extra room for the module groups whose backward stops above the lowest module (PassPlan.extra):
    `working` is the working memory of every module's backward, and a pass over the modules the backward reaches
    first, down to the first of the largest ones (whose per-example gradients and preconditioning any pass may need),
    is probed; below that module the extra room is interpolated linearly along the backward order (the layers above a
    module hold its pass's activations), down to none for the lowest module; with `plan.boundaries`, from the layers
    each group's pass holds (_room_from_kept). checked_room_above probes the passes planned with it. No extra room
    where the probe does not fit."""
    largest = max(plan.sizes[name] for name in plan.order) if plan.order else 0
    first = next((i for i, name in enumerate(plan.order) if plan.sizes[name] == largest), 0)
    last = len(plan.order) - 1
    if first >= last or plan.budget is None:
        return replace(plan, extra={})
    top = _probe(scorer, queries, train, plan, plan.order[:first + 1])
    if top is None:
        return replace(plan, extra={})
    if plan.boundaries:
        return replace(plan, extra=_room_from_kept(scorer, plan, working, top, _budget_scale(plan, plan_queries)))
    saved = max(working - top, 0) * _budget_scale(plan, plan_queries)
    return replace(plan, extra={name: int(saved * (last - max(i, first)) / (last - first))
                                for i, name in enumerate(plan.order)})


def _room_from_kept(scorer: "FusedScorer", plan: PassPlan, working: int, top: int, scale: float) -> dict:
    """PassPlan.extra for passes from kept gradients (`plan.boundaries`): a pass holds the activations of the layers
    from its lowest module's up to its highest module's, where its forward stops, each layer's about the same, so
    its working memory is estimated as `top` (the probe of a pass within the top layer) plus a layer's share of the
    rest of `working` (every module's backward: all the layers) for each layer more. The groups of a chunk are packed
    from the top as module_groups first packs them (before evening them out), each module's extra room estimated for
    the group it would end (its highest layer that of the group's first module); checked_room_above probes the groups
    as packed. `scale`: _budget_scale."""
    layers = len(scorer.blocks or ()) or 1
    # a module outside the layers (the classifier, the pooler) as above the top one
    layer = {name: layers - 1 if scorer.block_of.get(name) is None else scorer.block_of[name] for name in plan.order}
    per_layer = max(working - top, 0) / max(layers - 1, 1)
    extra, used, highest = {}, 0, None
    for name in plan.order:
        highest = layer[name] if highest is None else highest
        extra[name] = int(max(working - top - (highest - layer[name]) * per_layer, 0) * scale)
        size = plan.per_pass * plan.sizes[name]
        if used and used + size > plan.budget + extra[name]:  # `name` starts the next group
            highest, used = layer[name], 0
        used += size
    return extra


def checked_room_above(scorer: "FusedScorer", queries, train, plan: PassPlan, room: int, num_queries: int,
                       plan_queries: int = 0) -> PassPlan:
    """`plan` with each module group that holds more than the budget (of a full chunk, and of a shorter last chunk of
    the `num_queries` queries) probed as the pass it is, its backward down to its lowest module (with
    `plan.boundaries`, its forward up to where the pass before kept the gradients, FusedScorer.cuts, and the next
    pass's gradients taken): where the probe leaves less than the group holds, the extra room of its lowest module and
    of every module below (with `plan.boundaries`, of that module alone) is cut to what the probe leaves, and the
    groups are packed again, until every group fits. No extra room where a probe does not fit."""
    scale = _budget_scale(plan, plan_queries)
    chunks = {plan.per_pass, num_queries % plan.per_pass or plan.per_pass}
    probed = set()
    while True:
        for group, queries_held, cut in ((g, n, c) for n in sorted(chunks, reverse=True)
                                         for g, c in zip(plan.groups(n), pass_cuts(scorer, plan, n))):
            held = queries_held * sum(plan.sizes[name] for name in group)
            if held <= plan.budget or (tuple(group), queries_held, cut) in probed:
                continue  # within the budget, which every module's backward leaves, or probed
            probed.add((tuple(group), queries_held, cut))
            working = _probe(scorer, queries, train, plan, group, cut)
            if working is None:
                return replace(plan, extra={})
            allowed = max(int((room * MEMORY_HEADROOM - working) * scale) - plan.budget, 0)
            if held > plan.budget + allowed:
                # from the loss, a lower pass holds more; from kept gradients, each pass its own layers
                cut_back = group[-1:] if plan.boundaries else plan.order[plan.order.index(group[-1]):]
                plan = replace(plan, extra={**plan.extra, **{n: min(plan.extra[n], allowed) for n in cut_back}})
                break  # packed again with less room from this module down
        else:
            return plan


def pass_cuts(scorer: "FusedScorer", plan: PassPlan, queries: int) -> list:
    """Per module group of a chunk of `queries` queries, the (top, capture) layers its pass runs with where
    `plan.boundaries` (FusedScorer.cuts: the layer whose stored gradient starts its backward, and the next group's,
    whose gradient it takes; fused_pairwise_scores' passes), else None: from the loss, nothing taken."""
    groups = plan.groups(queries)
    if not plan.boundaries:
        return [None] * len(groups)
    tops = scorer.cuts(groups) + [None]
    return [(top, None if below == top else below) for top, below in zip(tops, tops[1:])]


def starts_from_kept(cuts: list) -> bool:
    """Whether a pass of `cuts` (pass_cuts) starts from the gradients a pass before kept."""
    return any(cut is not None and cut[0] is not None for cut in cuts)


def pass_count(plan: PassPlan, num_queries: int, plan_queries: int = 0) -> int:
    """Passes over the training rows: a pass per module group of each chunk of queries (with `plan_queries` above
    `num_queries`: the larger run's chunks, each cut into this chunk's groups, as with_budget plans them)."""
    if plan_queries > num_queries and plan.chunk_capacity:
        return math.ceil(plan_queries / min(plan_queries, plan.chunk_capacity)) * len(plan.groups(plan.per_pass))
    return sum(len(plan.groups(min(plan.per_pass, num_queries - start)))
               for start in range(0, num_queries, plan.per_pass))


def fewer_passes(scorer: FusedScorer, queries, train, plan: PassPlan, room: int, num_queries: int,
                 plan_queries: int = 0) -> PassPlan:
    """While the `num_queries` queries take several passes, a smaller training micro-batch, or one that does not grow
    for shorter rows, leaves room for more query gradients per pass but reads them more often: among `plan` without
    growth and the micro-batches halved down to MIN_TRAIN_MICRO rows with and without it (never more growth than
    `plan`'s), the one with the least estimated time, per training row passes × PASS_ROW_COST + queries ×
    micro-batches per row of `train` (micro_spans; the scores are the same sums; a module group's pass counts as a
    whole pass, an upper bound). The memory probes run on the longest rows of `queries` and `train`; a micro-batch
    that could not cost less than the best so far even in the fewest passes any plan can have (every query gradient
    held once, no pass holding more than the usable memory) is not probed: the same choice, fewer probes."""
    lengths, queries_read = scorer.lengths(train), max(num_queries, plan_queries)
    fewest = math.ceil(queries_read * sum(plan.sizes.values()) / max(room * MEMORY_HEADROOM, 1))

    def per_row(micro: int, growth: int) -> float:
        return len(micro_spans(lengths, max(len(lengths), 1), micro, growth=growth)) / max(len(lengths), 1)

    def cost(p: PassPlan) -> float:
        return pass_count(p, num_queries, plan_queries) * PASS_ROW_COST + queries_read * per_row(p.train_micro, p.growth)

    def planned(micro: int, growth: int) -> Optional[PassPlan]:
        trial = replace(plan, train_micro=micro, growth=growth, extra={})
        try:
            working = scorer.working_memory(queries, train, trial)
        except Exception as exc:
            if not should_reduce_batch_size(exc):
                raise
            clear_device_cache(garbage_collection=True)
            return None
        trial = with_budget(trial, int(room * MEMORY_HEADROOM - working), num_queries, plan_queries)
        return with_room_above(scorer, queries, train, trial, working, plan_queries) if trial.per_pass >= 1 else None

    best, micro, growths = plan, plan.train_micro, sorted({plan.growth, 1}, reverse=True)
    while pass_count(best, num_queries, plan_queries) > 1:
        for growth in growths:
            if (micro, growth) == (plan.train_micro, plan.growth) or \
                    fewest * PASS_ROW_COST + queries_read * per_row(micro, growth) >= cost(best):
                continue
            trial = planned(micro, growth)
            if trial is not None and cost(trial) < cost(best):
                best = trial
        micro //= 2
        if micro < MIN_TRAIN_MICRO:
            break
    return best


def fused_pairwise_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, query_dataset,
                          train_dataset, collator, query_batch_size: int, train_batch_size: int,
                          device: torch.device, max_queries_per_pass: int = 0, disable_tqdm: bool = False,
                          timings: dict = None, num_workers: int = 0, precondition=None, query_weights: dict = None,
                          train_weights: dict = None, plan_queries: int = 0, plan_rows: tuple = None,
                          boundaries: bool = True, boundary_memory: Optional[tuple] = None,
                          fp8_contraction: bool = False):
    """(queries × train) float32 scores, rows and columns in dataset order (see the module docstring). An
    out-of-memory error inside a chunk of queries halves its passes' memory (plan_passes, PassPlan.shrink) and redoes
    that chunk alone.
    `timings`, if given, receives the seconds spent planning the passes (from the call to the first pass), on query
    gradients and on training passes (`pass_seconds`: each pass's), where they went (`hooks`: utils.HookTimes of the
    query and training micro-batches, and inside them the per-example gradients, the query preconditioning, the
    contraction, and the boundary loads and stores: the passes' own stream's time queueing and awaiting the copies,
    which run on streams of their own; attempts that ran out of memory included), and the plan.
    `num_workers`: DataLoader processes collating the training micro-batches (the scores do not depend on it).
    `precondition(module name, gradient)`, if given, replaces the strategy's preconditioning of the query gradients
    (with the bias as the last input column); `query_weights` (model_weights's names), if given, are the weights the
    query gradients are taken at, the model's own being the training side's (`train_weights`, if given, a copy of
    them that is put back after each pass's query side; else one is made). `plan_queries`: the module groups of a run
    of that many queries (benchmark.py's subsets, with_budget); `plan_rows`: (queries, training rows) of that run,
    whose longest micro-batches the memory probes take instead of these rows' (a subset's longest rows may be
    shorter than the full run's). `boundaries`: where the model's encoder layers allow, each module group's pass after
    the first runs the forward up to its highest layer only and the backward from the gradients the pass before kept
    (BoundaryGradients; the same scores); False: every pass from the loss. `boundary_memory` (pin_ahead's training and
    query sides), if given, holds the gradients where the passes keep them; it is closed at the end, used or not.
    `fp8_contraction`: the contraction in e4m3 with row scales (fp8.py), else in the score dtype."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # the planning: the factors prepared, the rows sorted, the memory probes, the host memory for kept gradients
    clock = _Clock(device)
    model.eval()
    scorer = FusedScorer(model, task, factors, strategy, score_args, collator, device, num_workers, precondition,
                         query_weights, train_weights, fp8_contraction)
    # the training and the query sides' BoundaryGradients, and whether boundary_store was asked
    store, query_store, decided = None, None, False

    def kept() -> list:
        return [k for k in (store, query_store) if k is not None]
    q_order = longest_first(query_dataset)
    queries, (train, t_order) = query_dataset.select(q_order), scorer.sorted_rows(train_dataset)
    scores = torch.zeros(len(queries), len(train), dtype=torch.float32, device=device)
    seconds = {"query_seconds": 0.0, "train_seconds": 0.0, "planning_seconds": 0.0}
    undo = _frozen(model)
    try:
        with scorer.hooks:
            probe_rows = None if plan_rows is None else (plan_rows[0].select(longest_first(plan_rows[0])),
                                                         scorer.sorted_rows(plan_rows[1])[0])
            def planned(kept: bool) -> PassPlan:
                return plan_passes(scorer, queries, train, query_batch_size, train_batch_size, max_queries_per_pass,
                                   plan_queries, probe_rows, kept)
            plan = planned(boundaries and scorer.blocks is not None)
            first = min(plan.per_pass, len(queries))
            if starts_from_kept(pass_cuts(scorer, plan, first)):
                store, query_store = boundary_store(scorer, train, queries.select(range(first)), plan,
                                                    train_batch_size, len(plan.groups(first)), boundary_memory)
                decided = True
                if store is None:  # no host memory for the kept gradients: planned again for passes from the loss
                    plan = planned(False)
            seconds["planning_seconds"] = clock.lap()
            logger.info("fused scoring: %d queries × %d train rows, %d queries per chunk, rank %d of %d; planned in "
                        "%.1f s (%d memory probes)", len(queries), len(train), plan.per_pass, rank, world,
                        seconds["planning_seconds"], scorer.probes)
            start, passes, most_groups, pass_seconds = 0, 0, 0, []
            scorer.hooks.times.take()  # the passes' parts only, not the planning's probes
            while start < len(queries):
                def one_chunk(start=start):  # as many queries as the plan holds now (an out-of-memory retry shrinks it)
                    nonlocal store, query_store, decided
                    rows = slice(start, min(start + plan.per_pass, len(queries)))
                    held = rows.stop - rows.start
                    chunk, spent, each = queries.select(range(rows.start, rows.stop)), (0.0, 0.0), []
                    cuts = pass_cuts(scorer, plan, held)
                    if not decided and starts_from_kept(cuts):
                        # the first chunk in several groups after an out-of-memory retry (planned in one)
                        store, query_store = boundary_store(scorer, train, chunk, plan, train_batch_size, len(cuts),
                                                            boundary_memory)
                        decided = True
                        if store is None:  # declined: each group within the budget that a whole backward leaves
                            plan.boundaries, plan.extra = False, {}
                    groups = plan.groups(held)
                    if store is None:  # every pass from the loss
                        cuts = [None] * len(groups)
                    if store is not None:
                        store.reset()
                        query_store.reset()
                    for i, (group, cut) in enumerate(zip(groups, cuts)):  # the top layers' modules first: each score
                        # adds its modules' terms in the backward's order, as one pass over all of them would (the
                        # same bits)
                        desc = (f"fused scores, queries {rows.start + 1}-{rows.stop} of {len(queries)}"
                                + (f", module group {i + 1} of {len(groups)}" if len(groups) > 1 else ""))
                        plan.running = (len(chunk), group)
                        top, capture = cut or (None, None)
                        each.append(scorer.score_pass(chunk, group, train, scores[rows], plan, train_batch_size, desc,
                                                      disable_tqdm, top, capture, store, query_store))
                        spent = np.add(spent, each[-1])
                    plan.running = None
                    return rows, groups, spent, each

                def shrink(detail, start=start):  # the failed chunk is redone from scratch; the finished rows stay
                    scorer.query_grads.clear()
                    for k in kept():  # a load fetched ahead freed before the cache is cleared
                        k.reset()
                    scores[start:] = 0
                    plan.shrink("fused scores", detail, "free memory on the GPU or lower --max_length")
                rows, groups, (query_s, train_s), each = retry_on_oom(one_chunk, shrink, device)
                seconds["query_seconds"] += query_s
                seconds["train_seconds"] += train_s
                pass_seconds += [round(float(pass_s), 2) for _, pass_s in each]
                start, passes, most_groups = rows.stop, passes + len(groups), max(most_groups, len(groups))
    finally:
        try:
            undo()
        finally:
            # those pinned ahead, used or not; unregistered beside the writing of the scores and what follows
            close_all([store, query_store, *(boundary_memory or ())], wait=False)
    boundary_gib = sum(k.held for k in kept()) / 2**30  # the most any chunk took
    if timings is not None:
        timings.update({k: round(v, 3) for k, v in seconds.items()}, passes=passes, queries_per_pass=plan.per_pass,
                       boundary_gib=round(boundary_gib, 3),
                       boundary_wait_seconds=round(sum(k.waited for k in kept()), 3),
                       module_groups=most_groups, chunk_capacity=plan.chunk_capacity,
                       pass_capacity=plan.capacity, query_micro_batch=plan.query_micro,
                       train_micro_batch=plan.train_micro, train_growth=plan.growth,
                       out_of_memory_retries=plan.retries, pass_seconds=pass_seconds, hooks=scorer.hooks.times.take())
    if world > 1:
        dist.all_reduce(scores)
    return in_dataset_order(scores, q_order, t_order)


def in_dataset_order(scores: torch.Tensor, q_order: np.ndarray, t_order: np.ndarray) -> torch.Tensor:
    """`scores` (row i the query q_order[i], column j the training row t_order[j]) on the CPU with its rows and
    columns in dataset order, gathered where they are (on a GPU in milliseconds; a CPU scatter of SWAG's 2,000 ×
    73,536 scores takes about 2 s), on the CPU where the GPU has no room for the copies. A permutation: the same
    numbers either way."""
    rows, columns = (torch.from_numpy(np.argsort(order)) for order in (q_order, t_order))
    try:
        return scores.index_select(0, rows.to(scores.device)).index_select(1, columns.to(scores.device)).cpu()
    except torch.OutOfMemoryError:
        pass  # outside the except block, which holds the failed copy
    return scores.cpu().index_select(0, rows).index_select(1, columns)


def boundary_store(scorer: FusedScorer, train, chunk, plan: PassPlan, train_batch_size: int,
                   num_groups: int, ahead: Optional[tuple] = None) -> tuple:
    """BoundaryGradients for the training and the query sides of passes in `num_groups` module groups over the
    training rows `train` and chunks of queries like `chunk` (the first chunk in several groups), where one layer output's
    gradients for every training and query micro-batch take at most HOST_MEMORY_SHARE of the host memory available
    (boundary_host_memory, with what `ahead` has pinned so far); else (None, None): every pass from the loss and
    the measurement, and `ahead` closed. `ahead` (pin_ahead's pair), if given, holds the two sides."""
    sides = scorer.boundary_slots(train, plan, train_batch_size), scorer.query_boundary_slots(chunk, plan)
    needed = None if None in sides else sum(map(sum, sides))
    available = boundary_host_memory() + sum(block.numel() for store in ahead or () for block in list(store.pinned))
    if needed is None or needed > HOST_MEMORY_SHARE * available:
        logger.info("fused scoring: every pass from the loss (%s)", "the model's config gives no hidden_size"
                    if needed is None else f"the layer-output gradients between passes need {needed / 2**30:.1f} GiB "
                    f"of host memory, {available / 2**30:.1f} GiB available")
        close_all(ahead or ())
        return None, None
    logger.info("fused scoring: %d module groups, each pass after the first from the layer-output gradients the pass "
                "before kept (%.1f GiB of host memory)", num_groups, needed / 2**30)
    return ahead or new_stores(scorer.device, sides)


def fused_self_scores(model: nn.Module, task, factors: dict, strategy: str, score_args, train_dataset, collator,
                      train_batch_size: int, device: torch.device, disable_tqdm: bool = False, num_workers: int = 0):
    """(train,) float32 self-influence scores <H^-1 g_i, g_i> of every training row, in dataset order: kronfluence's
    `compute_self_scores` for the same factors, from the per-example gradients formed as in the pairwise pass.
    An out-of-memory error halves the micro-batch and redoes the pass (the longest batch, where it fails, is first)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.eval()
    scorer = FusedScorer(model, task, factors, strategy, score_args, collator, device, num_workers)
    train, order = scorer.sorted_rows(train_dataset)
    scores = torch.zeros(len(train), dtype=torch.float32, device=device)
    # one row per pass: only micro-batches halve; no grown micro-batches: nothing is read once per micro-batch here,
    # and the longest (first) one stays the largest, where an out-of-memory error comes first
    plan = PassPlan(1, 1, min(train_batch_size, len(train)), growth=1)
    undo = _frozen(model)
    try:
        with scorer.hooks:
            scorer.hooks.callback, scorer.hooks.dtype = scorer._add_self_scores, score_args.per_sample_gradient_dtype

            def one_pass():
                for start, stop, batch in scorer.train_batches(train, train_batch_size, plan.train_micro,
                                                               "fused self-influence", disable_tqdm, plan.growth):
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

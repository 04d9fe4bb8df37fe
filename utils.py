"""Generic helpers every script shares: the user-error convention, argument types, atomic writes and JSON, GPU
memory, processes and threads, logging. Nothing here knows about SWAG, models or scores."""

import argparse
import fcntl
import functools
import gc
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the user's input. Library code raises it; a script's entry point (`run_script`) prints it as
    one line, exit status 1, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message

    def __reduce__(self):  # raised in a worker process, it comes back with its message as given
        return type(self), (self.message,)


def run_script(main) -> None:
    """`if __name__ == "__main__": run_script(main)`: run a script's main, a UserError ending it in one line."""
    try:
        main()
    except UserError as exc:
        sys.exit(str(exc))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line: `retrain.py: error: argument --lds_repeats: ...` and exit status 2, without
    the usage block (several lines for these scripts; --help shows it)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="Also show the libraries' INFO logs (kronfluence's argument dumps and model repr).")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low: int):
    """argparse type: an integer >= low (the message names the allowed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    return parse


def number_above(low: float, inclusive: bool):
    """argparse type: a finite float > low (>= low when inclusive)."""
    bound = f"{'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not np.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text}")
        return value

    return parse

positive_float, non_negative_float = number_above(0, inclusive=False), number_above(0, inclusive=True)


def seed_value(text: str) -> int:
    """argparse type: a seed numpy and torch both take, 0 <= seed < 2**32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**32 - 1}, got {value}")
    return value


def fraction_below_one(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors about third-party failures."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()

_memory_caps = {}  # CUDA device index -> bytes this process may hold there (--max_memory_gb)


def limit_gpu_memory(gib: float, device: torch.device) -> None:
    """Cap this process's allocations on `device` at `gib` GiB (PyTorch's per-process memory fraction, so that
    kronfluence's stages keep to it too); `available_memory` plans within the cap."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise UserError(f"--max_memory_gb {gib:g} is more than the {total / 2**30:.1f} GiB of "
                        f"{torch.cuda.get_device_name(index)}; pass at most that")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)
    _memory_caps[index] = int(gib * 2**30)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on `device`: the device's free memory (within the cap, if one is set)
    plus what PyTorch's allocator holds unused. None on CPU, where no limit is known."""
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    cap = _memory_caps.get(device.index if device.index is not None else torch.cuda.current_device())
    room = free if cap is None else min(free, cap - reserved)
    return max(0, room) + reserved - allocated


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2's files of this process's container


def available_host_memory() -> int:
    """Bytes of host memory this process may still take: the host's available memory (psutil), within the cgroup's
    limit where one is set (a container; its inactive page cache counts as free, as the kernel reclaims it), shared
    by the host's torchrun processes (LOCAL_WORLD_SIZE)."""
    available = psutil.virtual_memory().available
    try:
        limit, used = ((CGROUP / name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            stat = dict(line.split() for line in (CGROUP / "memory.stat").read_text().splitlines())
            available = min(available, int(limit) - int(used) + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):  # no cgroup v2 memory controller here
        pass
    return max(available, 0) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def process_seconds() -> float:
    """Seconds since this process started (its interpreter's start-up and imports included). On Linux from the kernel's
    clock since boot, to 10 ms (psutil's start time adds the boot time, which Linux gives in whole seconds)."""
    try:
        with open("/proc/self/stat") as f:  # the start time is the 22nd field; the command name may hold spaces
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            seconds = float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        seconds = -1.0
    # a container's virtualised uptime (lxcfs) counts from its own start, the start time from the host's boot
    return seconds if seconds >= 0 else time.time() - psutil.Process().create_time()


@contextmanager
def collector_paused():
    """Python's cycle collector off inside the block: building objects that live on (the tokenized rows, the model)
    triggers a full collection each time the heap has grown by a quarter, each one walking everything built so far."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def long_lived_frozen():
    """Inside the block the cycle collector skips every object alive at its start (gc.freeze; gc.unfreeze at the
    end). An analysis holds about half a million Python objects from start to end (SWAG's tokenized rows, the model),
    which each full collection walks (0.25 s on one core), and kronfluence and the memory planner call gc.collect()
    between stages and memory probes, besides the collector's own full collections."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class HookTimes:
    """Where a stage's time goes, part by named part of its loop: per name the calls, the host's seconds inside them
    (the Python that launches the part's kernels) and the device's (CUDA events at the part's start and end in the
    current stream, read once they have passed, so nothing waits for them; on a CPU the host's). Host seconds near
    the stage's wall clock mean the host bounds the stage; a part's device seconds include the device's idle time
    inside the part."""

    RESOLVE_EVERY = 1024  # parts between reads of the events that have passed

    def __init__(self):
        self.calls, self.host, self.device, self._pending = {}, {}, {}, []
        self._resolve_at = self.RESOLVE_EVERY  # pending parts at which to read the passed ones

    @contextmanager
    def part(self, name: str, cuda: bool):
        """Time the block as `name`; `cuda`: its kernels run on the current CUDA device."""
        events = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)] if cuda else None
        if events:
            events[0].record()
        started = time.perf_counter()
        try:
            yield
        finally:
            host = time.perf_counter() - started
            self.calls[name] = self.calls.get(name, 0) + 1
            self.host[name] = self.host.get(name, 0.0) + host
            if events:
                events[1].record()
                self._pending.append((name, *events))
                if len(self._pending) >= self._resolve_at:
                    self._resolve(wait=False)
                    self._resolve_at = len(self._pending) + self.RESOLVE_EVERY  # no rescan of those still pending
            else:
                self.device[name] = self.device.get(name, 0.0) + host

    def _resolve(self, wait: bool) -> None:
        pending, self._pending = self._pending, []
        for name, start, end in pending:
            if wait or end.query():
                end.synchronize()
                self.device[name] = self.device.get(name, 0.0) + start.elapsed_time(end) / 1e3
            else:
                self._pending.append((name, start, end))

    def take(self) -> dict:
        """{name: {"calls", "host_seconds", "device_seconds"}} of the parts since the last take (waiting for their
        events), and a fresh start."""
        self._resolve(wait=True)
        summary = {name: {"calls": calls, "host_seconds": round(self.host[name], 3),
                          "device_seconds": round(self.device.get(name, 0.0), 3)} for name, calls in self.calls.items()}
        self.calls, self.host, self.device, self._resolve_at = {}, {}, {}, self.RESOLVE_EVERY
        return summary


class GpuBusy:
    """The share of a block's wall time in which the GPU ran a kernel, without a profiler: a thread reads NVML's
    utilization (torch.cuda.utilization: the percent of the driver's last sample period, 1/6 s to 1 s, with a kernel
    running) every INTERVAL seconds while the block runs, and `share` is their mean over 100. A stage whose share is
    well below 1 waits on its host (Python launching kernels, loading batches); near 1 its kernels bound it. A coarse
    figure for blocks of a few seconds (the first samples' periods reach back before the block, up to a second; the
    block's last INTERVAL goes unsampled). `share` is None on a CPU, without NVML (pynvml) or when no sample was
    taken. `sample`: the reading (tests)."""

    INTERVAL = 0.1  # seconds between samples

    def __init__(self, device: torch.device, sample=None):
        self.sample = sample or (functools.partial(torch.cuda.utilization, device) if device.type == "cuda" else None)
        self.samples, self._stop, self._thread = [], threading.Event(), None

    def __enter__(self):
        try:
            if self.sample is not None:
                self.sample()  # NVML is there
        except Exception:  # a diagnostic: without NVML nothing is measured, and the share says so (None)
            self.sample = None
        if self.sample is not None:
            self._thread = threading.Thread(target=self._run, name="GPU busy share", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            try:
                self.samples.append(self.sample())
            except Exception:  # NVML gone (the driver reset): the samples so far stand
                return

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def share(self) -> Optional[float]:
        return round(sum(self.samples) / len(self.samples) / 100, 2) if self.samples else None


def out_of_memory_detail(exc: BaseException, device: torch.device) -> str:
    """What an out-of-memory error asked for and what the device had, in a few words."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", str(exc))
    room = available_memory(device)
    return ", ".join(part for part in (f"it asked for {asked.group(1)} more" if asked else "",
                                       f"{room / 2**30:.1f} GiB available" if room is not None else "") if part) \
        or first_line(exc)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-"


@contextmanager
def _renames_locked(directory: Path):
    """Hold an exclusive lock on `directory` (flock on the directory itself: no lock file) while a swap's renames,
    or the recovery of a killed one, run: processes that recover or swap the same path at once take turns."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def finish_interrupted_swaps(path: Path) -> None:
    """Complete or undo what killed processes of this host left beside `path` in `atomic_output`: a finished
    directory waiting to be swapped in (`<pid>.new`) is moved into place, a replaced one set aside (`<pid>.old`) is
    deleted once its successor is in place or put back if none is, and unfinished temporaries (`<pid>`) are
    removed. A process that is still running keeps its own. Writers call it first; readers may too (the renames
    run under a lock on the parent directory, so concurrent callers never act on each other's leftovers)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = _temporary_prefix(path)
    with _renames_locked(path.parent):
        leftovers = {}
        for found in path.parent.glob(f"{glob.escape(prefix)}*"):
            pid, _, state = found.name[len(prefix):].partition(".")
            if pid.isdigit() and state in ("", "new", "old") and not _process_alive(int(pid)):
                leftovers.setdefault(int(pid), {})[state] = found
        for pid in sorted(leftovers):
            parts = leftovers[pid]
            if "new" in parts:  # the block had finished: its result goes in, whatever the swap had reached
                if path.exists():
                    _remove(path)
                os.replace(parts["new"], path)
            if "old" in parts:
                _remove(parts["old"]) if path.exists() else os.replace(parts["old"], path)
            if "" in parts:  # a block that never finished
                _remove(parts[""])


def _present(path: Path) -> bool:
    """Whether `path` holds something a writer must not replace unasked (an empty directory does not)."""
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


@contextmanager
def atomic_output(path: Path, replace: bool = True):
    """Write `path` (a file or a directory) atomically: the block writes the temporary path it is given, which
    replaces `path` only when the block completes. Temporaries are hidden, beside `path`, and named after the host
    and process, so concurrent writers never share one. A directory is swapped in three renames (the finished
    temporary to `<pid>.new`, the old directory to `<pid>.old`, `.new` into place); a process killed between them
    leaves names from which `finish_interrupted_swaps` completes the swap. With `replace=False` a `path` that
    exists when the block completes is left alone and the result is kept beside it (`FileExistsError` names it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_swaps(path)
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        with _renames_locked(path.parent):
            if not replace and _present(path):
                kept = path.with_name(f"{path.name}.new-{os.getpid()}")
                os.replace(tmp, kept)
                raise FileExistsError(f"{path} appeared while this process wrote it; the result is in {kept}")
            if tmp.is_dir():
                new, old = tmp.with_name(f"{tmp.name}.new"), tmp.with_name(f"{tmp.name}.old")
                os.replace(tmp, new)  # from here on the result is finished: a kill leaves it to be swapped in
                if path.exists():  # os.replace cannot replace a directory that is not empty
                    os.replace(path, old)
                os.replace(new, path)
                _remove(old)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():  # the block failed
            _remove(tmp)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} file {path} is not valid JSON ({exc}); is it truncated? delete it and rerun") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_cpu_threads() -> None:
    """One CPU thread unless OMP_NUM_THREADS asks for more (CPU-only machines; GPU runs keep PyTorch's default).
    PyTorch's default, a thread per core, slows down when another busy process shares the cores: its threads wait
    for each other at every operation (a demo epoch on 2 cores beside one busy process: 3.0 s at one thread, 5.5 s
    at two); on idle cores one thread costs about 30% (42.6 s against 33.0 s for the demo's training). Results
    depend on the thread count (sums split differently), so a fixed default also gives every machine the same demo
    output."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)

# Collating a batch on the host (rows from Arrow, transformers' padding) costs 0.3-0.5 ms a row of real text (40-60 ms
# per 128 rows on one core), about half of the GPU's time on the same rows in a scoring pass: worker processes collate
# ahead into pinned memory, so the main process only launches the GPU's work and the copies overlap it.
LOADER_WORKERS = 4


def process_cores() -> int:
    """This process's share of the cores it may run on: torchrun's processes on one host split them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def loader_workers(requested: Optional[int], device: torch.device) -> int:
    """DataLoader worker processes for the analysis: `requested`, else on a GPU LOADER_WORKERS, at most this process's
    share of the cores it may run on (torchrun's processes on one host split them) less one, and none on a CPU,
    where the workers would take the cores the computation runs on. Forked workers only collate; unless the user
    set it, HF tokenizers' parallelism is switched off before they fork (it would warn, then turn itself off in
    each worker)."""
    if requested is None and device.type == "cuda":
        requested = min(LOADER_WORKERS, process_cores() - 1)
    workers = max(requested or 0, 0)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return workers


QUIET_LOGGERS = ["kronfluence"]  # INFO floods: every argument dataclass, the model repr, the tokenizer's vocabulary


def setup_logging(verbose: bool = False) -> None:
    """This project's INFO lines; the libraries' INFO only with --verbose. kronfluence's deprecated
    torch.cuda.amp.GradScaler call warns on every stage: that one warning, from kronfluence, is hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
                                category=FutureWarning, module=r"kronfluence\.")


def process_rank():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def process_device(local_rank: Optional[int] = None) -> torch.device:
    """This process's device for independent runs: local ranks (torchrun's, or a forked worker's) share the visible
    GPUs round-robin (so several processes may share one GPU), made current so that pinned memory and CUDA state
    land on it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = process_rank()[2] if local_rank is None else local_rank
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    torch.cuda.set_device(device)
    return device


def retry_on_oom(run, shrink, device: torch.device):
    """run() until it fits in GPU memory, returning its result: after each out-of-memory error, shrink(detail)
    makes the next attempt smaller (or raises a UserError when nothing is left to shrink), then the cache is
    emptied. The one retry loop of the project: halving_on_oom and the fused pass's PassPlan use it."""
    while True:
        try:
            return run()
        except Exception as exc:  # the error's frames hold tensors: leave the except block before freeing them
            if not should_reduce_batch_size(exc):
                raise
            detail = out_of_memory_detail(exc, device)
        shrink(detail)
        clear_device_cache(garbage_collection=True)


def halving_on_oom(stage: str, run, sizes: dict, device: torch.device) -> dict:
    """run(**sizes) until it fits in memory: after each out-of-memory error the next of `sizes` (by turns) is
    halved and the stage reruns. Returns the sizes that fit. Not under torch.distributed, where the other ranks
    would wait in a collective: there the error names the flag to halve. kronfluence's own batch-size search
    is not used: it probes the first rows, which are the shortest in length order, and not under DDP."""
    sizes, turns = dict(sizes), [0]

    def halve(detail: str) -> None:
        names = [name for name in sizes if sizes[name] > 1]
        flags = ", ".join(f"--{name} {sizes[name]}" for name in sizes)
        if not names:
            raise UserError(f"{stage}: out of GPU memory at {flags} ({detail}); free memory on the GPU (other jobs, "
                            f"a larger --max_memory_gb) or lower --max_length")
        name = names[turns[0] % len(names)]
        if dist.is_initialized():
            raise UserError(f"{stage}: out of GPU memory at {flags} ({detail}); pass --{name} {sizes[name] // 2}")
        logger.warning("%s: out of GPU memory at %s (%s); retrying with --%s %d", stage, flags, detail, name,
                       sizes[name] // 2)
        sizes[name] //= 2
        turns[0] += 1

    retry_on_oom(lambda: run(**sizes), halve, device)
    return sizes


def configure_attention(cudnn: bool = False, mask_check: bool = False) -> None:
    """Process-wide attention settings for speed; the attention is mathematically the same (on a GPU an unpadded
    batch may now run another kernel, with rounding differences). Called by every script that runs the model;
    `cudnn=True, mask_check=True` restores PyTorch's and transformers' defaults (for A/B timing and tests).

    - cuDNN is taken out of PyTorch's attention kernels (flash / memory-efficient remain). cuDNN builds an
      execution plan for every new (batch, padded length) shape, about 10 ms of host time each, and with dynamic
      padding nearly every batch is a new shape.
    - The padding mask is always built, never checked. transformers skips building it when nothing is padded,
      and to know that it evaluates `padding_mask.all()` in a Python `if`: the host waits for the GPU in every
      forward, so it cannot queue the next step while the GPU works, and under DDP the ranks run in lockstep.
      An all-true mask gives the same attention, so the check is dropped through transformers' public
      `AttentionMaskInterface` (registered under "sdpa", for this process only; checkpoints are unchanged).
    """
    from transformers import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    def sdpa_mask_always_built(*args, **kwargs):
        return sdpa_mask(*args, **{**kwargs, "allow_is_bidirectional_skip": False})

    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    AttentionMaskInterface.register("sdpa", sdpa_mask if mask_check else sdpa_mask_always_built)

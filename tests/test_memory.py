"""Memory: fused passes sized from the memory available, out-of-memory errors halved away, and the NaN guard.

A CPU has no memory query, so the tests fake it (utils.available_memory and the working-memory probe) and
raise torch.OutOfMemoryError where a GPU would run out."""

import copy
import json
import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMultipleChoice

import analyze
import formats
import fused_scores
import utils
from demo import build_demo_model, build_demo_tokenizer, make_demo_dataset
from fused_scores import BoundaryGradients, FusedScorer, fused_pairwise_scores, fused_self_scores, query_gradient_bytes
from influence import AnalysisConfig
from pipeline import make_collator, tokenize
from task import MultipleChoiceTask
from utils import UserError

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB."
GiB = 2**30


@pytest.fixture(scope="module")
def setup():
    raw = make_demo_dataset(sizes={"train": 12, "validation": 8})
    tokenizer = build_demo_tokenizer(raw)
    torch.manual_seed(0)
    model = build_demo_model(tokenizer).double().eval()
    return model, tokenize(raw["train"], tokenizer), tokenize(raw["validation"], tokenizer), make_collator(tokenizer)


def identity_scores(setup, timings=None, **kwargs):
    """Identity-preconditioned float64 fused scores (no factors to fit), query and training batches of 2."""
    model, train, queries, collator = setup
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64
    return fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, queries, train,
                                 collator, query_batch_size=2, train_batch_size=2, device=torch.device("cpu"),
                                 disable_tqdm=True, timings=timings, **kwargs)


def fake_memory(monkeypatch, room: int, working: int):
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: room)
    monkeypatch.setattr(FusedScorer, "working_memory", lambda self, queries, train, plan, active=None, cut=None: working)


def per_query_bytes(setup) -> int:
    model = setup[0]
    modules = fused_scores.tracked_linears(model, fused_scores.linear_module_names(model))
    return sum(query_gradient_bytes(modules, torch.float64).values())


def test_a_pass_holds_the_module_groups_that_fit_beside_the_working_memory(setup, monkeypatch):
    """The room, less the working memory, holds 3.5 queries' gradients: the 8 queries go in one chunk of 3 module
    groups (8 / 3.5 → at least 3, and the model's modules are small enough to pack 3). Each score then adds the
    same terms in the same order as one pass over every module does: equal bitwise."""
    per_query = per_query_bytes(setup)
    working = 5 * per_query
    room = int((working + 3.5 * per_query) / fused_scores.MEMORY_HEADROOM)
    fake_memory(monkeypatch, room, working)
    timings = {}
    planned = identity_scores(setup, timings)
    assert (timings["pass_capacity"], timings["queries_per_pass"], timings["module_groups"], timings["passes"]) \
        == (3, 8, 3, 3)
    monkeypatch.undo()
    one_pass = {}
    assert torch.equal(planned, identity_scores(setup, one_pass))
    assert (one_pass["module_groups"], one_pass["passes"]) == (1, 1)


def test_a_module_groups_pass_backpropagates_down_to_its_lowest_module_only(setup, monkeypatch):
    """With the room for 1.2 queries' gradients the first group holds the top layer's modules: in its pass the first
    encoder layer's output needs no gradient (the backward stops above it); the last group's pass reaches it."""
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int(1.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    seen = []
    original = fused_scores.FusedScorer.score_pass

    def score_pass(self, chunk, group, *args, **kwargs):
        layer = next(m for n, m in self.model.named_modules() if n.endswith("encoder.layer.0"))
        handle = layer.register_forward_hook(lambda m, i, out: seen.append((group, out[0].requires_grad)))
        try:
            return original(self, chunk, group, *args, **kwargs)
        finally:
            handle.remove()
    monkeypatch.setattr(fused_scores.FusedScorer, "score_pass", score_pass)
    timings = {}
    grouped = identity_scores(setup, timings)
    assert timings["module_groups"] > 1
    first, last = seen[0][0], seen[-1][0]
    assert not any(grad for group, grad in seen if group is first)
    assert all(grad for group, grad in seen if group is last) and any("layer.0." in name for name in last)
    assert not any("layer.0." in name for name in first)
    monkeypatch.undo()
    assert torch.equal(grouped, identity_scores(setup))


def test_module_groups_of_a_kronfluence_wrapped_model_under_autocast_give_the_same_bits(setup, monkeypatch):
    """kronfluence's prepared model under bf16 autocast with float32 gradients: below a pass's modules the wrappers
    run as their original modules, so every module sees the bf16 outputs one pass over all of them sees (a wrapper
    would add its float32 constant there and hand float32 values up)."""
    model, train, queries, collator = setup
    prepared = prepare_model(copy.deepcopy(model).float(), MultipleChoiceTask())
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.amp_dtype = torch.bfloat16
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float32

    def run(timings):
        return fused_pairwise_scores(copy.deepcopy(prepared), MultipleChoiceTask(), {}, "identity", args, queries, train,
                                     collator, query_batch_size=2, train_batch_size=2, device=torch.device("cpu"),
                                     disable_tqdm=True, timings=timings)
    one, grouped = {}, {}
    single = run(one)
    # room for one query's float32 gradients (half the float64 bytes): 9 groups, some cutting a layer's modules apart
    fake_memory(monkeypatch, int(per_query_bytes(setup) / 2 / fused_scores.MEMORY_HEADROOM), 0)
    original, kept = fused_scores._backward, []
    monkeypatch.setattr(fused_scores, "_backward", lambda *args: kept.append(len(args) > 6 and args[6] is not None)
                        or original(*args))
    assert torch.equal(run(grouped), single)
    assert (one["module_groups"], grouped["module_groups"]) == (1, 9) and any(kept)  # passes from kept gradients


def layer_runs(monkeypatch, layer: int, side: str = "train") -> list:
    """Per pass (score_pass), whether encoder layer `layer` ran a forward on its `side` ("train" or "query")."""
    runs, original = [], fused_scores.FusedScorer.score_pass

    def score_pass(self, chunk, group, *args, **kwargs):
        ran, callback = [], self._add_scores if side == "train" else self._keep_query
        hook = lambda m, i, o: ran.append(self.hooks.callback == callback)
        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            return original(self, chunk, group, *args, **kwargs)
        finally:
            handle.remove()
            runs.append((group, any(ran)))
    monkeypatch.setattr(fused_scores.FusedScorer, "score_pass", score_pass)
    return runs


@pytest.mark.parametrize("side", ["train", "query"])
def test_later_module_groups_start_at_the_gradient_the_pass_before_kept(setup, monkeypatch, side):
    """Room for 1.2 queries' gradients: several module groups. A pass over the first encoder layer's modules alone
    runs the forward up to that layer and its backward from the layer-output gradients the pass before stored, on its
    training side and on its query side, so the top layer runs on neither; every pass from the loss (and the
    measurement) runs it. The scores are the same bits (float64 on CPU), and the stored gradients take the host bytes
    FusedScorer.boundary_slots and query_boundary_slots estimate."""
    model, train, queries = setup[:3]
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int(1.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    runs, stores = layer_runs(monkeypatch, layer=1, side=side), []
    monkeypatch.setattr(fused_scores, "BoundaryGradients",
                        lambda *args, **kwargs: stores.append(BoundaryGradients(*args, **kwargs)) or stores[-1])
    timings, loss_timings = {}, {}
    cut = identity_scores(setup, timings)
    assert timings["module_groups"] > 2 and len(stores) == 2  # the training side's and the query side's
    below = [ran for group, ran in runs if all(".layer.0." in name for name in group)]
    assert below and not any(below)
    assert all(ran for group, ran in runs if not all(".layer.0." in name for name in group))
    runs.clear()
    from_loss = identity_scores(setup, loss_timings, boundaries=False)
    assert all(ran for _, ran in runs) and loss_timings["boundary_gib"] == 0
    assert torch.equal(cut, from_loss)
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    scorer = FusedScorer(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, setup[3], torch.device("cpu"))
    plan = fused_scores.PassPlan(8, 2, 2)
    assert stores[0].held == sum(scorer.boundary_slots(scorer.sorted_rows(train)[0], plan, 2)) == stores[0].expected > 0
    assert stores[1].held == sum(scorer.query_boundary_slots(scorer.sorted_rows(queries)[0], plan)) \
        == stores[1].expected > 0
    assert not stores[0].slots and not stores[1].slots
    assert timings["boundary_gib"] == round((stores[0].held + stores[1].held) / 2**30, 3)


@pytest.mark.parametrize("side", ["train", "query"])
def test_an_out_of_memory_error_in_a_pass_from_kept_gradients_redoes_the_chunk_from_the_loss(setup, monkeypatch,
                                                                                             side):
    """An out-of-memory error in the second micro-batch of one side of the first pass that starts from kept
    gradients shrinks the plan and redoes the chunk from its first pass, whose gradients the later passes start from
    again: the same bits as passes from the loss."""
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int(2.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    original, calls = fused_scores._backward, []

    def backward(*args):
        measurement, boundary = args[5], (args[6] if len(args) > 6 else None)
        if measurement == (side == "query"):
            calls.append(boundary is not None)  # a backward of this side from a kept gradient
            if sum(calls) == 2 and calls[-1]:
                raise torch.OutOfMemoryError(OOM)
        return original(*args)
    monkeypatch.setattr(fused_scores, "_backward", backward)
    timings = {}
    retried = identity_scores(setup, timings)
    assert sum(calls) > 2 and timings["out_of_memory_retries"] == 1 and timings["boundary_gib"] > 0
    monkeypatch.undo()
    assert torch.equal(retried, identity_scores(setup, boundaries=False))


def test_several_chunks_of_queries_start_each_later_pass_from_kept_gradients(setup, monkeypatch):
    """Room for three queries' gradients of the largest module: the 8 queries come in chunks of 3, 3 and 2, each in
    several module groups whose later passes start both sides from the gradients the pass before kept (the stores
    laid out again for each chunk): the same bits as every pass from the loss and the measurement."""
    model = setup[0]
    modules = fused_scores.tracked_linears(model, fused_scores.linear_module_names(model))
    largest = max(query_gradient_bytes(modules, torch.float64).values())
    fake_memory(monkeypatch, int(3.5 * largest / fused_scores.MEMORY_HEADROOM), 0)
    original, from_kept = fused_scores._backward, []
    monkeypatch.setattr(fused_scores, "_backward", lambda *args: from_kept.append(
        (args[5], len(args) > 6 and args[6] is not None)) or original(*args))
    timings = {}
    chunks = identity_scores(setup, timings)
    assert timings["queries_per_pass"] == 3 and timings["passes"] > 3 * 2  # 3 chunks, several groups each
    assert (True, True) in from_kept and (False, True) in from_kept  # both sides from kept gradients
    monkeypatch.setattr(fused_scores, "_backward", original)
    assert torch.equal(chunks, identity_scores(setup, boundaries=False))


def test_query_weights_of_their_own_start_later_passes_from_kept_gradients(setup, monkeypatch):
    """source.py's query side at other weights than the training side's: its kept gradients are the query weights'
    own, the same bits as every pass from the loss and the measurement."""
    model = setup[0]
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int(1.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    torch.manual_seed(1)
    other = {name: w + 0.05 * torch.randn_like(w) for name, w in fused_scores.model_weights(model).items()}
    timings = {}
    kept = identity_scores(setup, timings, query_weights=other)
    assert timings["module_groups"] > 2 and timings["boundary_gib"] > 0
    assert torch.equal(kept, identity_scores(setup, boundaries=False, query_weights=other))
    assert not torch.equal(kept, identity_scores(setup, boundaries=False))  # the query weights count


def test_host_memory_pinned_ahead_holds_both_sides_of_the_passes(setup, monkeypatch):
    """pin_ahead (analyze.py, before the factors): on a GPU where the queries' gradients exceed the free memory, the
    training and the query sides' BoundaryGradients of the bytes the plan's first choice of micro-batches needs; none
    where the gradients fit, off a GPU, or where the host memory is short. fused_pairwise_scores keeps its gradients in
    them (no store of its own), gives the bits of passes from the loss, and closes them, used or not."""
    model, train, queries, collator = setup
    per_query = per_query_bytes(setup)
    made = []
    monkeypatch.setattr(fused_scores, "BoundaryGradients", lambda device, expected=0, slots=None: made.append(
        BoundaryGradients(torch.device("cpu"), expected, slots)) or made[-1])  # a CPU store: no CUDA streams here
    gpu = torch.device("cuda")

    def ahead(room, device=gpu):
        monkeypatch.setattr(fused_scores, "available_memory", lambda device: room)
        return fused_scores.pin_ahead(model, collator, train, queries, 2, 2, torch.float64, device)

    assert ahead(len(queries) * per_query) is None and ahead(per_query, torch.device("cpu")) is None and not made
    pinned = ahead(per_query)
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    scorer = FusedScorer(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, collator,
                         torch.device("cpu"))
    plan = fused_scores.PassPlan(8, 2, 2)
    assert made == list(pinned) and [store.expected for store in pinned] == [
        sum(scorer.boundary_slots(scorer.sorted_rows(train)[0], plan, 2)),
        sum(scorer.query_boundary_slots(scorer.sorted_rows(queries)[0], plan))] and min(s.expected for s in pinned) > 0
    monkeypatch.setattr(fused_scores, "available_host_memory", lambda: 2 * sum(s.expected for s in pinned) - 1)
    assert ahead(per_query) is None
    monkeypatch.setattr(fused_scores, "available_host_memory", lambda: 2**40)
    closed, waits = [], []

    def closing(self, wait=True, close=BoundaryGradients.close):
        closed.append(self)
        waits.append(wait)
        return close(self, wait)
    monkeypatch.setattr(BoundaryGradients, "close", closing)
    fake_memory(monkeypatch, int(1.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    made.clear()
    timings = {}
    kept = identity_scores(setup, timings, boundary_memory=pinned)
    # closed after the last pass without waiting for the unregistering (BoundaryGradients.close(wait=False))
    assert not made and closed == list(pinned) and waits == [False, False]
    assert timings["module_groups"] > 2 and [store.held for store in pinned] == [store.expected for store in pinned]
    unused = tuple(BoundaryGradients(torch.device("cpu"), store.expected) for store in pinned)
    assert torch.equal(kept, identity_scores(setup, boundaries=False, boundary_memory=unused))
    assert all(store in closed for store in unused)
    # too little host memory when the passes start: every pass from the loss, and the memory pinned ahead given back
    # before them (the last backward already sees it closed)
    declined = tuple(BoundaryGradients(torch.device("cpu"), store.expected) for store in pinned)
    monkeypatch.setattr(fused_scores, "available_host_memory", lambda: 1000)
    original, seen = fused_scores._backward, []
    monkeypatch.setattr(fused_scores, "_backward", lambda *args: seen.append(
        all(store in closed for store in declined)) or original(*args))
    timings = {}
    assert torch.equal(kept, identity_scores(setup, timings, boundary_memory=declined))
    assert timings["boundary_gib"] == 0 and seen[-1] and not seen[0]


def test_host_memory_is_read_after_an_earlier_scorings_pinned_memory_is_given_back(setup, monkeypatch):
    """pin_ahead and boundary_store (through the fused scores' passes) read the available host memory only after
    the blocks a closed store is still unregistering are given back (release_pending): an ensemble's next member,
    or a second analysis in the process, does not count them as in use."""
    model, train, queries, collator = setup
    events = []
    monkeypatch.setattr(fused_scores, "release_pending", lambda: events.append("given back"))
    monkeypatch.setattr(fused_scores, "available_host_memory", lambda: events.append("read") or 2**40)
    monkeypatch.setattr(fused_scores, "BoundaryGradients", lambda device, expected=0, slots=None:
                        BoundaryGradients(torch.device("cpu"), expected, slots))  # a CPU store: no CUDA streams here
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: per_query_bytes(setup))
    assert fused_scores.pin_ahead(model, collator, train, queries, 2, 2, torch.float64, torch.device("cuda"))
    assert events[:2] == ["given back", "read"]  # (each store's creation waits for them too)
    events.clear()
    fake_memory(monkeypatch, int(1.2 * per_query_bytes(setup) / fused_scores.MEMORY_HEADROOM), 0)
    identity_scores(setup)
    assert events[:2] == ["given back", "read"]


def test_analyze_hands_the_memory_pinned_ahead_to_the_fused_scores_and_closes_it(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    """analyze.py --scoring fused makes pin_ahead's stores before the factors and hands them to the fused scores,
    which close them; where a factor stage fails, the analysis closes them itself."""
    made, handed, closed = [], [], []
    monkeypatch.setattr(analyze, "pin_ahead", lambda *args: made.append(
        (BoundaryGradients(torch.device("cpu"), 1), BoundaryGradients(torch.device("cpu"), 1))) or made[-1])
    monkeypatch.setattr(BoundaryGradients, "close", lambda self, wait=True, close=BoundaryGradients.close:
                        closed.append(self) or close(self, wait))
    import influence
    monkeypatch.setattr(influence, "fused_pairwise_scores", lambda *args, fused=influence.fused_pairwise_scores,
                        **kwargs: handed.append(kwargs["boundary_memory"]) or fused(*args, **kwargs))
    base = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity", "--scoring", "fused"]
    analyze.main([*base, "--output_dir", str(tmp_path / "scored")])
    assert len(made) == 1 and handed == made and all(store in closed for store in made[0])

    def failing(*args, **kwargs):
        raise RuntimeError("a factor stage failed")
    monkeypatch.setattr(analyze, "fit_factors", failing)
    with pytest.raises(RuntimeError, match="a factor stage failed"):
        analyze.main([*base, "--output_dir", str(tmp_path / "failed")])
    assert len(made) == 2 and len(handed) == 1 and all(store in closed for store in made[1])


def test_layer_output_gradients_that_do_not_fit_the_host_memory_leave_every_pass_from_the_loss(setup, monkeypatch,
                                                                                               caplog):
    """With less host memory available than twice the layer-output gradients, no pass starts from stored ones."""
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int(1.2 * per_query / fused_scores.MEMORY_HEADROOM), 0)
    monkeypatch.setattr(fused_scores, "available_host_memory", lambda: 1000)
    runs = layer_runs(monkeypatch, layer=1)
    caplog.set_level("INFO", logger="fused_scores")
    timings = {}
    identity_scores(setup, timings)
    assert timings["module_groups"] > 2 and timings["boundary_gib"] == 0 and all(ran for _, ran in runs)
    assert "every pass from the loss (the layer-output gradients between passes need" in caplog.text


def test_cuts_start_a_group_at_its_highest_layer_when_the_pass_before_reaches_it(setup):
    """The first group and any group with a module outside the encoder layers (the classifier, the pooler) start
    from the loss; a later group from the layer holding its highest module, unless that layer is above the start
    of the pass before."""
    model, collator = setup[0], setup[3]
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    scorer = FusedScorer(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, collator, torch.device("cpu"))
    head = ["classifier", "roberta.pooler.dense"]
    ffn1, query0 = "roberta.encoder.layer.1.intermediate.dense", "roberta.encoder.layer.0.attention.self.query"
    assert scorer.cuts([head, [ffn1], [query0]]) == [None, 1, 0]
    assert scorer.cuts([[ffn1], [query0, ffn1]]) == [None, 1]
    assert scorer.cuts([[ffn1, query0], ["classifier"], [query0]]) == [None, None, 0]
    assert scorer.cuts([[query0], [ffn1]]) == [None, 1]  # the pass before, from the loss, passes layer 1
    assert scorer.cuts([head, [query0], [ffn1]]) == [None, 0, None]  # layer 1 lies above the pass before's start


def test_boundary_gradients_keep_each_micro_batch_apart():
    """Slots cut from shared blocks: each micro-batch gets back the bits it stored, also after another slot is
    written; a micro-batch whose gradient changes shape within a chunk is an error, and reset lays them out again."""
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=12_344)
    store.BLOCK = 4096
    # 840 and 504 bytes share the first block; 3,000 take a second; 8,000, above a block, a block of their own
    gradients = [torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(2, 9, 7), torch.randn(30, 25), torch.randn(2000)]
    for i, gradient in enumerate(gradients):
        store.store(i, gradient)
    store.store(0, gradients[0] * 2)
    assert torch.equal(store.load(0), gradients[0] * 2)
    assert all(torch.equal(store.load(i), gradients[i]) for i in (1, 2, 3))
    assert [b.numel() for b in store.blocks] == [4096, 4096, 8000] and store.nbytes() == sum(g.nbytes for g in gradients)
    with pytest.raises(RuntimeError, match="a boundary gradient of \\(3, 5\\) for a slot of \\(3, 5, 7\\)"):
        store.store(0, torch.zeros(3, 5, dtype=torch.float64))
    store.reset()
    assert store.held == sum(g.nbytes for g in gradients) and not store.blocks and len(store.spare) == 3
    with pytest.raises(RuntimeError, match="no boundary gradient stored for micro-batch 1"):
        store.load(1)
    small = fused_scores.BoundaryGradients(torch.device("cpu"), expected=840)
    small.store(0, gradients[0])
    assert [block.numel() for block in small.blocks] == [1024]  # the power of two above what is expected


def _pin_ahead_allocator(monkeypatch, fail_at=None):
    """BoundaryGradients pinning as on a GPU, through a fake allocator: a pinned block waits for a permit of `permits`
    (the test hands them out), and is logged with the thread that asked; the `fail_at`-th pin raises as
    cudaHostRegister does. Returns (the log, the permits, the blocks unpinned)."""
    pinned, permits, unpinned = [], threading.Semaphore(0), []

    def allocate(nbytes, pin):
        if pin:
            assert permits.acquire(timeout=10)
            pinned.append((nbytes, threading.current_thread().name))
            if len(pinned) == fail_at:
                raise torch.cuda.CudaError(2)  # cudaErrorMemoryAllocation
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(fused_scores.BoundaryGradients, "BLOCK", 4096)
    monkeypatch.setattr(fused_scores.BoundaryGradients, "_allocate", staticmethod(allocate))
    monkeypatch.setattr(fused_scores.BoundaryGradients, "_unpin", staticmethod(unpinned.append))
    monkeypatch.setattr(fused_scores.BoundaryGradients, "_pins", staticmethod(lambda device: True))
    return pinned, permits, unpinned


def test_a_pinned_block_is_a_mapping_that_forked_workers_do_not_inherit(monkeypatch):
    """BoundaryGradients._allocate's pinned block: its own anonymous mapping, marked not to be inherited on fork
    (DataLoader workers are forked while the blocks are pinned; the kernel copies pinned pages into each child), its
    pages written, then registered with CUDA, and unregistered by _unpin (cudart faked: no GPU here)."""
    calls = []
    fake = type("cudart", (), {"cudaHostRegister": staticmethod(lambda ptr, n, flags: calls.append(("register", ptr, n))
                                                                or 0),
                               "cudaHostUnregister": staticmethod(lambda ptr: calls.append(("unregister", ptr)) or 0)})
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    block = fused_scores.BoundaryGradients._allocate(3 * 4096, pin=True)
    start = block.data_ptr()
    assert calls == [("register", start, 3 * 4096)] and start % 4096 == 0 and not block.any()
    mappings = Path("/proc/self/smaps").read_text().split("\n")
    heads = [i for i, line in enumerate(mappings) if line.split(" ")[0].count("-") == 1 and ":" not in line.split(" ")[0]]
    head = next(i for i in heads if int(mappings[i].split("-")[0], 16) == start)
    flags = next(line for line in mappings[head:] if line.startswith("VmFlags:")).split()
    assert "dc" in flags  # VM_DONTCOPY: madvise(MADV_DONTFORK)
    fused_scores.BoundaryGradients._unpin(block)
    assert calls[-1] == ("unregister", start)


def test_boundary_blocks_are_pinned_ahead_by_a_thread_and_a_slot_waits_only_for_its_block(monkeypatch):
    """A thread pins the expected bytes' blocks (whole ones: 3 of 4,096 for 8,892 bytes) as soon as the store exists;
    slots are cut from them in order, the first slot waiting for the first block only (the others not pinned yet),
    and a block beyond them is pinned where it is needed (slots of 3,200 bytes, one a block). The values come back
    bitwise; close() stops the thread and unpins every block."""
    pinned, permits, unpinned = _pin_ahead_allocator(monkeypatch)
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=2 * 4096 + 700)
    gradients = [torch.randn(40, 20, dtype=torch.float32) for _ in range(4)]
    threading.Timer(0.1, permits.release).start()  # one block, while the first slot waits for it
    store.store(0, gradients[0])
    assert pinned == [(4096, "pin boundary blocks")] and store.waited > 0  # the other two still wait for permits
    permits.release(3)
    for i, gradient in enumerate(gradients[1:], 1):
        store.store(i, gradient)
    # three ahead by the thread, one more when needed
    assert pinned == [(4096, "pin boundary blocks")] * 3 + [(4096, "pin a boundary block")] and len(store.blocks) == 4
    assert all(torch.equal(store.load(i), g) for i, g in enumerate(gradients))
    blocks = list(store.blocks)
    store.close()
    assert not store.thread.is_alive() and not store.blocks and not store.pinned
    assert [id(b) for b in unpinned] == [id(b) for b in blocks]


def test_blocks_pinned_ahead_are_those_the_slots_layout_takes(monkeypatch):
    """With the slots' sizes known (boundary_slots), the thread pins the blocks their layout takes: four slots of
    3,200 bytes, one a block of 4,096 (a slot never straddles two), are four blocks, not the three that 12,800 bytes
    would fill; none is pinned in place. Aligned to 512 bytes, slots of 1,900 bytes go two a block."""
    pinned, permits, _ = _pin_ahead_allocator(monkeypatch)
    permits.release(100)
    gradients = [torch.randn(40, 20, dtype=torch.float32) for _ in range(4)]
    store = fused_scores.BoundaryGradients(torch.device("cpu"), slots=[g.nbytes for g in gradients])
    for i, gradient in enumerate(gradients):
        store.store(i, gradient)
    assert store.expected == 4 * 3200 and pinned == [(4096, "pin boundary blocks")] * 4 and store.waited >= 0
    assert all(torch.equal(store.load(i), g) for i, g in enumerate(gradients))
    store.close()
    assert store._ahead(4 * 1900, [1900] * 4) == [4096] * 2 and store._ahead(4 * 2100, [2100] * 4) == [4096] * 4
    assert store._ahead(300, [100, 200]) == [1024]  # below BLOCK one block, a power of two holding both aligned slots


def test_the_next_chunk_reuses_the_pinned_blocks(monkeypatch):
    """After reset (a chunk's first pass), the slots are cut from the blocks pinned for the chunk before: nothing is
    pinned again, the values come back bitwise, and close() unpins each block once."""
    pinned, permits, unpinned = _pin_ahead_allocator(monkeypatch)
    permits.release(100)
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=3 * 3200)
    for chunk in range(3):
        gradients = [torch.randn(40, 20) + chunk for _ in range(3)]
        store.reset()
        for i, gradient in enumerate(gradients):
            store.store(i, gradient)
        assert all(torch.equal(store.load(i), g) for i, g in enumerate(gradients))
        assert len(pinned) == 3 and len(store.blocks) == 3 and not store.spare
    store.close()
    assert len(unpinned) == 3 and len({id(b) for b in unpinned}) == 3 and not store.pinned


def test_a_slot_larger_than_a_block_ends_the_pinning_ahead(monkeypatch):
    """Slots of 8,192 bytes with blocks of 4,096: each is pinned on its own, and the first one stops the thread and
    unpins the blocks it pinned ahead for the same bytes, so that they are not held beside them."""
    pinned, permits, unpinned = _pin_ahead_allocator(monkeypatch)
    permits.release(100)
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=3 * 8192)
    gradients = [torch.randn(2048) for _ in range(3)]
    for i, gradient in enumerate(gradients):
        store.store(i, gradient)
    ahead = sum(thread == "pin boundary blocks" for _, thread in pinned)
    assert not store.thread.is_alive() and store.coming == 0 and store.ahead.empty()
    assert len(unpinned) == ahead and all(b.numel() == 4096 for b in unpinned)
    assert [size for size, thread in pinned if thread == "pin a boundary block"] == [8192] * 3 and len(store.pinned) == 3
    assert all(torch.equal(store.load(i), g) for i, g in enumerate(gradients))
    store.close()
    assert len(unpinned) == ahead + 3 and not store.pinned


def test_a_block_that_fails_to_unregister_leaves_the_others_unregistered(monkeypatch, caplog):
    """A failing cudaHostUnregister, for a block pinned ahead and unused (the thread stopped by a slot above a block),
    is logged and the block kept (its pages stay locked) while the others are unregistered; close() tries it again,
    and keeps what fails there too."""
    pinned, permits, unpinned = _pin_ahead_allocator(monkeypatch)
    permits.release(100)
    failures = []

    def unpin(block):
        if not failures or (len(failures) == 1 and block is failures[0] and len(unpinned) == 2):
            failures.append(block)  # the first block asked for, at the stop and again at close()
            raise RuntimeError("CUDA error: invalid argument\nmore")
        unpinned.append(block)
    monkeypatch.setattr(fused_scores.BoundaryGradients, "_unpin", staticmethod(unpin))
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=3 * 4096)
    store.thread.join()  # three blocks pinned ahead
    with caplog.at_level(logging.WARNING, logger="fused_scores"):
        store.store(0, torch.randn(2048))  # 8,192 bytes, above a block: the thread's blocks released
        assert len(store.pinned) == 2 and len(unpinned) == 2  # the failed block and the slot's own
        store.close()
    assert [r.getMessage() for r in caplog.records] == [
        "fused scoring: unregistering a pinned block failed (CUDA error: invalid argument)"] * 2
    assert len(unpinned) == 3 and [id(b) for b in store.pinned] == [id(failures[0])]


def test_a_store_closed_without_waiting_unregisters_its_blocks_in_a_thread_the_next_store_waits_for(monkeypatch,
                                                                                                    caplog):
    """close(wait=False) returns at once, the store holding no block, while a thread unregisters its blocks in
    order (here each held until released); a store created meanwhile first waits for that thread, so that the host
    never holds both stores' blocks. A block that fails to unregister there is logged and kept referenced."""
    pinned, permits, _ = _pin_ahead_allocator(monkeypatch)
    permits.release(100)
    unpinned, go, calls = [], threading.Semaphore(0), []

    def unpin(block):
        assert go.acquire(timeout=10)
        calls.append(block)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: invalid argument")
        unpinned.append(block)
    monkeypatch.setattr(fused_scores.BoundaryGradients, "_unpin", staticmethod(unpin))
    monkeypatch.setattr(fused_scores, "_STILL_PINNED", [])
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=3 * 4096)
    for i in range(3):  # a block each
        store.store(i, torch.randn(1024))
    blocks = list(store.pinned)
    assert len(blocks) == 3 and len(store.blocks) == 3
    store.close(wait=False)
    assert not store.pinned and not unpinned and len(fused_scores._RELEASES) == 1  # nothing unregistered yet
    created = []
    later = threading.Thread(target=lambda: created.append(fused_scores.BoundaryGradients(torch.device("cpu"))))
    with caplog.at_level(logging.WARNING, logger="fused_scores"):
        later.start()
        go.release()
        for _ in range(1000):  # the first block unregistered (a 10 s bound)
            if unpinned:
                break
            threading.Event().wait(0.01)
        assert not created and [id(b) for b in unpinned] == [id(blocks[0])]  # the new store waits for the other two
        go.release(2)
        later.join(timeout=10)
    assert created and not fused_scores._RELEASES
    assert [id(b) for b in unpinned] == [id(blocks[0]), id(blocks[2])]
    assert [id(b) for b in fused_scores._STILL_PINNED] == [id(blocks[1])]
    assert [r.getMessage() for r in caplog.records] == [
        "fused scoring: unregistering a pinned block failed (CUDA error: invalid argument)"]


def test_pinning_that_fails_in_the_thread_leaves_the_slots_in_ordinary_memory(monkeypatch, caplog):
    """cudaHostRegister failing in the thread (host memory locked elsewhere) ends the pinning: the slot that waited for
    the block, and every later one, take ordinary memory, in one log line; the values come back bitwise, and close()
    still unpins the block pinned before the failure."""
    pinned, permits, unpinned = _pin_ahead_allocator(monkeypatch, fail_at=2)
    permits.release(100)
    store = fused_scores.BoundaryGradients(torch.device("cpu"), expected=3 * 4096)
    store.thread.join()
    gradients = [torch.randn(40, 20) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="fused_scores"):
        for i, gradient in enumerate(gradients):
            store.store(i, gradient)
    assert len(pinned) == 2 and not store.pin and len(store.blocks) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "fused scoring: pinning host memory failed (out of memory (2)); the layer-output gradients go to "
        "ordinary host memory"]
    assert all(torch.equal(store.load(i), g) for i, g in enumerate(gradients))
    first = store.blocks[0]
    store.close()
    assert [id(b) for b in unpinned] == [id(first)]


def test_available_host_memory_keeps_within_the_cgroup_and_is_shared_by_the_hosts_ranks(monkeypatch, tmp_path):
    """The host's available memory; within a cgroup v2 limit, the limit less what the cgroup uses, its inactive page
    cache counted as free; divided among the host's torchrun processes."""
    monkeypatch.setattr(utils.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**40})())
    monkeypatch.setattr(utils, "CGROUP", tmp_path)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert utils.available_host_memory() == 2**40  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text(f"{2**35}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2**34}\ninactive_file {2**33}\nactive_file 5\n")
    assert utils.available_host_memory() == 2**40  # no limit
    (tmp_path / "memory.max").write_text(f"{2**36}\n")
    assert utils.available_host_memory() == 2**36 - 2**35 + 2**33
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert utils.available_host_memory() == (2**36 - 2**35 + 2**33) // 4


def test_module_groups_are_contiguous_evened_out_and_as_few_as_packing_gives():
    order, sizes = list("abcde"), dict(a=4, b=1, c=1, d=1, e=4)
    assert fused_scores.module_groups(order, sizes, None) == [order]
    assert fused_scores.module_groups(order, sizes, 11) == [order]
    assert fused_scores.module_groups(order, sizes, 7) == [["a", "b", "c"], ["d", "e"]]  # 6 + 5, not 7 + 4
    assert fused_scores.module_groups(order, sizes, 5) == [["a"], ["b", "c", "d"], ["e"]]  # 4 + 3 + 4, not 5 + 2 + 4
    assert fused_scores.module_groups(order, sizes, 2) == [["a"], ["b", "c"], ["d"], ["e"]]  # a module above the budget


def test_a_pass_saves_more_activations_the_deeper_its_lowest_module(setup):
    """What the extra room of the higher groups rests on: autograd saves the activations of the layers above a pass's
    lowest module only, so the bytes it saves for the backward grow with the depth of that module in the backward
    order, and a pass over the top module alone saves a fraction of what a pass over every module does."""
    model, train, queries, collator = setup
    model = copy.deepcopy(model)
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    scorer = FusedScorer(model, MultipleChoiceTask(), {}, "identity", args, collator, torch.device("cpu"))
    undo = fused_scores._frozen(model)
    try:
        with scorer.hooks:
            order = scorer.backward_order(queries)
            scorer.hooks.callback = lambda *_: None
            saved = []
            for depth in range(0, len(order), 3):
                scorer.hooks.active, total = set(order[:depth + 1]), [0]

                def pack(tensor, total=total):
                    total[0] += tensor.numel() * tensor.element_size()
                    return tensor
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    scorer._backward(train.select(range(4)), measurement=False)
                saved.append(total[0])
    finally:
        undo()
    assert saved == sorted(saved) and saved[0] * 4 < saved[-1], saved


def test_groups_whose_backward_stops_higher_hold_more():
    """Six modules of 10 bytes, a budget of 15: alone each needs its own pass. With the extra room of passes that stop
    higher (45 bytes for the top module's down to none for the lowest), packing from the top gives 3 groups, each
    within the budget plus its lowest module's extra room."""
    order, sizes = list("abcdef"), dict.fromkeys("abcdef", 10)
    extra = dict(zip(order, [45, 40, 30, 20, 10, 0]))
    assert fused_scores.module_groups(order, sizes, 15) == [[n] for n in order]
    groups = fused_scores.module_groups(order, sizes, 15, extra)
    assert groups == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert all(sum(sizes[n] for n in g) <= 15 + extra[g[-1]] for g in groups)


class DepthProbes:
    """A scorer's working_memory where a pass's working memory grows with the depth of its lowest module in the
    backward order: `top` bytes for the first module's pass, `full` for the last's, `shape(depth)` (0 to 1) between."""

    def __init__(self, top: int, full: int, shape):
        self.top, self.full, self.shape, self.calls = top, full, shape, []

    def working_memory(self, queries, train, plan, active=None, cut=None):
        depth = 1.0 if active is None else max(plan.order.index(n) for n in active) / (len(plan.order) - 1)
        self.calls.append(None if active is None else tuple(active))
        return int(self.top + (self.full - self.top) * self.shape(depth))


@pytest.mark.parametrize("shape", [lambda d: d, lambda d: min(1.0, 2 * d)], ids=["linear", "steeper than linear"])
def test_the_extra_room_of_higher_groups_is_probed_until_every_group_fits(shape):
    """12 modules of 10 bytes a query, 4 queries, room for 240 bytes (216 usable), a full backward's working memory of
    176 (a budget of 40: one module a pass) and 16 for the top module's pass alone. The extra room interpolated along
    the backward order is checked by probing each group as its pass: where the working memory grows faster than
    linearly, the groups that the interpolation overfilled are cut back. Every group then fits beside its probed
    working memory, in fewer passes than the budget alone allows."""
    order = [f"m{i}" for i in range(12)]
    plan = fused_scores.PassPlan(4, 1, 1, budget=40, order=order, sizes=dict.fromkeys(order, 10), chunk_capacity=4)
    room, usable = 240, int(240 * fused_scores.MEMORY_HEADROOM)
    scorer = DepthProbes(16, usable - 40, shape)
    planned = fused_scores.with_room_above(scorer, None, None, plan, usable - 40)
    assert planned.extra["m0"] == usable - 40 - 16 and planned.extra["m11"] == 0
    checked = fused_scores.checked_room_above(scorer, None, None, planned, room, 4)
    groups = checked.groups(4)
    for group in groups:
        assert 4 * 10 * len(group) + scorer.working_memory(None, None, plan, group) <= usable, group
    linear = shape(0.5) == 0.5  # the interpolation is exact: no group is cut back
    assert (checked.extra == planned.extra) == linear
    assert [len(g) for g in groups] == ([3, 3, 2, 1, 1, 1, 1] if linear else [3, 2, 1, 1, 1, 1, 1, 1, 1])
    assert len(plan.groups(4)) == 12


@pytest.mark.parametrize("plan_queries", [0, 22], ids=["a run", "a subset planned as a larger run"])
def test_the_extra_room_starts_below_the_first_largest_module_and_covers_a_shorter_last_chunk(plan_queries):
    """The first probe runs the modules down to the first of the largest (index 2 here), whose per-example gradients
    any pass may need; the modules above it get that probe's extra room, those below it the interpolation. 7 queries
    in chunks of 4 (also for a subset planned as a run of 22, whose chunks also hold 4): the last chunk's 3-query
    groups are probed too, and every group of both chunk sizes fits."""
    order = [f"m{i}" for i in range(12)]
    sizes = {**dict.fromkeys(order, 10), "m2": 20, "m7": 20}
    plan = fused_scores.PassPlan(4, 1, 1, budget=80, order=order, sizes=sizes, chunk_capacity=4)
    room, usable = 300, int(300 * fused_scores.MEMORY_HEADROOM)
    scorer = DepthProbes(16, usable - 80, lambda d: min(1.0, 2 * d))
    planned = fused_scores.with_room_above(scorer, None, None, plan, usable - 80, plan_queries)
    top = scorer.working_memory(None, None, plan, order[:3])
    assert scorer.calls[0] == tuple(order[:3])
    assert [planned.extra[n] for n in order[:3]] == [usable - 80 - top] * 3 and planned.extra["m11"] == 0
    checked = fused_scores.checked_room_above(scorer, None, None, planned, room, 7, plan_queries)
    for queries in (4, 3):
        for group in checked.groups(queries):
            held = queries * sum(sizes[n] for n in group)
            assert held <= 80 or held + scorer.working_memory(None, None, plan, group) <= usable, (queries, group)


def test_a_group_that_fits_keeps_its_extra_room():
    """The group [m0, m1, m2] was given 100 bytes beyond the budget of 10 and holds 30; its probe leaves 26 beyond the
    budget, less than it was given but enough: nothing is cut, so the modules below keep their room too."""
    order = [f"m{i}" for i in range(4)]
    extra = {"m0": 100, "m1": 100, "m2": 100, "m3": 0}
    plan = fused_scores.PassPlan(1, 1, 1, budget=10, order=order, sizes=dict.fromkeys(order, 10), extra=extra)
    assert plan.groups(1) == [["m0", "m1", "m2"], ["m3"]]
    scorer = DepthProbes(0, 82, lambda d: d)
    checked = fused_scores.checked_room_above(scorer, None, None, plan, 100, 1)
    assert scorer.calls == [("m0", "m1", "m2")] and checked.extra == extra


def test_a_failed_pass_of_one_module_halves_the_queries():
    """A single module's pass ran out of memory: more module groups cannot make it smaller, so the queries halve at
    once, even where other passes hold several modules."""
    def plan(running):
        p = fused_scores.PassPlan(4, 2, 2, budget=80, order=list("abc"), sizes={"a": 10, "b": 10, "c": 15}, growth=1)
        p.running = running
        return p
    assert plan(None).groups(4) == [["a", "b"], ["c"]]  # 80 and 60 bytes
    several, alone = plan((4, ["a", "b"])), plan((3, ["c"]))
    for failed in (several, alone):
        failed.shrink("fused scores", "detail", "hint")
    assert (several.per_pass, several.budget, several.groups(4)) == (4, 40, [["a"], ["b"], ["c"]])
    assert (alone.per_pass, alone.budget) == (2, 40)


def test_a_smaller_training_micro_batch_is_planned_with_its_own_extra_room(monkeypatch):
    """Working memory in proportion to the training micro-batch and growing with the pass's depth: fewer_passes
    halves the micro-batch of 4 rows (8 queries in 10 module groups) to 2 (6 groups), and the plan it returns has the
    extra room of 2-row micro-batches, not the 4-row plan's."""
    class Probes:
        def lengths(self, rows):  # rows of one length: micro-batches of train_micro rows (micro_spans)
            return np.full(64, 10)

        def working_memory(self, queries, train, plan, active=None, cut=None):
            depth = 1.0 if active is None else max(plan.order.index(n) for n in active) / (len(plan.order) - 1)
            return plan.train_micro * int(4 + 36 * depth)
    monkeypatch.setattr(fused_scores, "MIN_TRAIN_MICRO", 1)
    order, scorer = [f"m{i}" for i in range(12)], Probes()
    room = int(240 / fused_scores.MEMORY_HEADROOM) + 1
    usable = int(room * fused_scores.MEMORY_HEADROOM)
    plan = fused_scores.with_budget(fused_scores.PassPlan(8, 1, 4, order=order, sizes=dict.fromkeys(order, 10)),
                                    usable - 160, 8)
    plan = fused_scores.with_room_above(scorer, None, None, plan, 160)
    best = fused_scores.fewer_passes(scorer, None, None, plan, room, 8)
    assert (len(plan.groups(8)), best.train_micro, len(best.groups(8))) == (10, 2, 6)
    own = fused_scores.with_room_above(scorer, None, None, replace(best, extra={}), 80).extra
    assert best.extra == own != plan.extra


class GrowthProbes:
    """32 long rows then 96 rows a quarter as long (micro_spans grows their micro-batches 4x): a probe's working
    memory is `per_row` bytes for each row of its largest micro-batch (train_probes), as the per-example gradients
    a micro-batch forms grow with its rows; the longest rows' activations count as rows too."""

    def __init__(self, per_row: int):
        self.per_row, self.probing, self.probes = per_row, "train", []

    def lengths(self, rows):
        return np.array([40] * 32 + [10] * 96)

    def working_memory(self, queries, train, plan, active=None, cut=None):
        self.probes.append((plan.train_micro, plan.growth))
        return self.per_row * max(b - a for a, b in fused_scores.train_probes(self.lengths(None), plan.train_micro,
                                                                               plan.growth))


@pytest.mark.parametrize("usable, growth", [(2_100, 1), (20_000, 4)], ids=["small GPU", "large GPU"])
def test_the_plan_weighs_micro_batches_without_growth_where_it_costs_passes(usable, growth, monkeypatch):
    """12 modules of 10 bytes a query, 64 queries (640 bytes a module a pass), micro-batches of 8 rows growing to 32
    for the short rows, 20 bytes a row of working memory. With 2,100 bytes usable the grown micro-batches' 640 bytes
    leave room for 2 modules a pass (6 passes), without growth 160 bytes leave room for 3 (4 passes); a grown
    micro-batch of 2 rows also needs 160 but reads the queries for 28 micro-batches against 16: the plan keeps 8 rows
    and drops the growth. No plan takes fewer than 4 passes (7,680 bytes of query gradients, 2,100 a pass), at which
    4 rows without growth, and 2 rows either way, still cost more than 8 rows without growth: they are not probed.
    With 20,000 bytes every query fits in one pass and the growth stays, unsearched."""
    monkeypatch.setattr(fused_scores, "MIN_TRAIN_MICRO", 2)
    order, scorer = [f"m{i}" for i in range(12)], GrowthProbes(20)
    room = int(usable / fused_scores.MEMORY_HEADROOM) + 1
    assert int(room * fused_scores.MEMORY_HEADROOM) == usable
    plan = fused_scores.PassPlan(64, 1, 8, order=order, sizes=dict.fromkeys(order, 10))
    plan = fused_scores.with_budget(plan, usable - scorer.working_memory(None, None, plan), 64)
    best = fused_scores.fewer_passes(scorer, None, None, plan, room, 64)
    assert (best.train_micro, best.growth) == (8, growth)
    if growth == 1:
        assert (fused_scores.pass_count(plan, 64), fused_scores.pass_count(best, 64)) == (6, 4)
        assert set(scorer.probes) == {(8, 4), (8, 1), (4, 4)}  # the others cannot win even in 4 passes
    else:
        assert fused_scores.pass_count(best, 64) == 1 and scorer.probes == [(8, 4)]


def test_a_training_probe_out_of_memory_drops_the_growth_before_halving_the_micro_batch(monkeypatch):
    """plan_passes: the first probe of grown micro-batches runs out of memory on the training side: the plan retries
    the same micro-batch without growth, and halves it only if that fails too."""
    class Probes(GrowthProbes):
        def working_memory(self, queries, train, plan, active=None, cut=None):
            if active is None and plan.growth > 1:
                self.probes.append((plan.train_micro, plan.growth))
                raise torch.OutOfMemoryError(OOM)
            return super().working_memory(queries, train, plan, active)
    scorer = Probes(10)
    scorer.backward_order = lambda queries: [f"m{i}" for i in range(12)]
    scorer.modules = {}
    scorer.score_args, scorer.fp8 = AnalysisConfig().score_arguments(), False
    scorer.device = torch.device("cuda")
    monkeypatch.setattr(fused_scores, "query_gradient_bytes", lambda modules, dtype, fp8_rows: {f"m{i}": 10 for i in range(12)})
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: 100_000)
    monkeypatch.setattr(fused_scores, "clear_device_cache", lambda **kwargs: None)
    monkeypatch.setattr(fused_scores, "out_of_memory_detail", lambda exc, device: "2.00 GiB more")
    plan = fused_scores.plan_passes(scorer, list(range(64)), list(range(128)), 4, 8)
    assert scorer.probes[0] == (8, 4) and (plan.train_micro, plan.growth, plan.retries) == (8, 1, 1)


def test_a_probe_that_runs_out_of_memory_leaves_no_extra_room():
    """Either probe of the extra room running out of memory: the plan keeps the full backward's budget alone."""
    class Failing(DepthProbes):
        def __init__(self, fail):
            super().__init__(0, 176, lambda d: d)
            self.fail = fail

        def working_memory(self, queries, train, plan, active=None, cut=None):
            if active is not None and self.fail(active):
                raise torch.OutOfMemoryError(OOM)
            return super().working_memory(queries, train, plan, active)
    order = [f"m{i}" for i in range(12)]
    plan = fused_scores.PassPlan(4, 1, 1, budget=40, order=order, sizes=dict.fromkeys(order, 10), chunk_capacity=4)
    assert fused_scores.with_room_above(Failing(lambda active: True), None, None, plan, 176).extra == {}
    planned = fused_scores.with_room_above(Failing(lambda active: len(active) > 1), None, None, plan, 176)
    assert planned.extra["m0"] > 0
    assert fused_scores.checked_room_above(Failing(lambda active: len(active) > 1), None, None, planned, 240,
                                           4).extra == {}


def test_a_subsets_extra_room_is_scaled_as_its_budget():
    """A subset of 4 queries planned as a chunk of 8 (plan_queries): its budget holds half the bytes of the full
    chunk's (with_budget), and so does its extra room."""
    order = [f"m{i}" for i in range(12)]
    plan = fused_scores.PassPlan(4, 1, 1, budget=40, order=order, sizes=dict.fromkeys(order, 10), chunk_capacity=8)
    scorer = DepthProbes(16, 176, lambda d: d)
    full = fused_scores.with_room_above(scorer, None, None, plan, 176)
    subset = fused_scores.with_room_above(scorer, None, None, plan, 176, plan_queries=8)
    assert all(subset.extra[n] == int(full.extra[n] / 2) or subset.extra[n] == full.extra[n] // 2 for n in order)
    assert subset.extra["m0"] == 80 and full.extra["m0"] == 160


def test_an_out_of_memory_error_first_takes_the_extra_room_away():
    """A pass that held more than the budget runs out of memory: the extra room goes, the budget stays. One that held
    no more than the budget (the lowest group's) runs out: the extra room goes and the pass's bytes are halved too."""
    def plan():
        return fused_scores.PassPlan(4, 2, 2, budget=40, order=list("abc"), sizes=dict.fromkeys("abc", 10),
                                     extra={"a": 80, "b": 40, "c": 0}, growth=1)
    assert plan().groups(4) == [["a", "b"], ["c"]]
    for running, after in [(None, (1, 40, 4)), ((4, ["a", "b"]), (1, 40, 4)), ((4, ["c"]), (1, 20, 2))]:
        failed = plan()
        failed.running = running
        failed.shrink("fused scores", "detail", "hint")
        assert (failed.extra, (failed.retries, failed.budget, failed.per_pass)) == ({}, after), running
        assert failed.groups(failed.per_pass) == [["a"], ["b"], ["c"]]


def test_module_groups_with_extra_room_give_the_same_bits(setup, monkeypatch):
    """Fake memory where the full backward's working memory leaves room for one query's gradients: with the same
    working memory for every pass, the 8 queries take 9 module groups; where a pass's working memory grows with its
    depth (none for the top module's pass), the higher groups hold more modules: 5 groups, and the scores equal one
    pass's bitwise."""
    per_query = per_query_bytes(setup)
    monkeypatch.setattr(fused_scores, "available_memory",
                        lambda device: int(6 * per_query / fused_scores.MEMORY_HEADROOM))
    groups = {}
    for name, probes in {"flat": DepthProbes(5 * per_query, 5 * per_query, lambda d: d),
                         "deeper needs more": DepthProbes(0, 5 * per_query, lambda d: d)}.items():
        monkeypatch.setattr(FusedScorer, "working_memory", lambda self, queries, train, plan, active=None, cut=None, p=probes:
                            p.working_memory(queries, train, plan, active))
        timings = {}
        scores = identity_scores(setup, timings)
        groups[name] = timings["module_groups"]
        assert timings["queries_per_pass"] == 8
    assert groups == {"flat": 9, "deeper needs more": 5}
    monkeypatch.undo()
    assert torch.equal(scores, identity_scores(setup))


@pytest.fixture(scope="module")
def deeper(setup):
    """The demo model with 4 encoder layers (random weights): passes from kept gradients need layers to skip."""
    model, train, queries, collator = setup
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    return AutoModelForMultipleChoice.from_config(config).double().eval(), train, queries, collator


def layer_span_memory(per_layer: int):
    """A working_memory whose bytes are `per_layer` for each encoder layer a pass holds activations of: from the layer
    of its lowest module (a module outside the layers counts as above the last) up to where its forward stops (the
    last layer without a cut)."""
    def working_memory(self, queries, train, plan, active=None, cut=None):
        layers = len(self.blocks)
        lowest = min(layers if self.block_of[n] is None else self.block_of[n] for n in (active or self.modules))
        top = layers - 1 if cut is None or cut[0] is None else cut[0]
        return (top - lowest + 1) * per_layer
    return working_memory


def test_probe_runs_run_a_pass_from_kept_gradients_as_it_runs(deeper, monkeypatch):
    """The memory probe of a module group whose pass starts from a kept gradient runs that pass: the forward stops at
    the group's top layer on both sides, the query side's per-example gradients are those of the group's modules (from
    zeros at the top), and the gradient at the next group's top is taken for every training micro-batch probed."""
    model, train, queries, collator = deeper
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64
    model = copy.deepcopy(model)
    scorer = FusedScorer(model, MultipleChoiceTask(), {}, "identity", args, collator, torch.device("cpu"))
    undo = fused_scores._frozen(model)
    ran, preconditioned, taken = [], [], []
    handles = [block.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, block in enumerate(scorer.blocks)]
    precondition = scorer._precondition
    scorer._precondition = lambda name, w, b: preconditioned.append(name) or precondition(name, w, b)
    try:
        with scorer.hooks:
            queries, train = queries.select(fused_scores.longest_first(queries)), scorer.sorted_rows(train)[0]
            order = scorer.backward_order(queries)
            sizes = query_gradient_bytes(scorer.modules, torch.float64)
            # a layer's modules a group (the classifier and pooler with the top layer's)
            plan = fused_scores.PassPlan(len(queries), 2, 2, budget=sum(sizes[n] for n in order[:8]) * len(queries),
                                         order=order, sizes=sizes, growth=1, boundaries=True)
            groups, cuts = plan.groups(len(queries)), fused_scores.pass_cuts(scorer, plan, len(queries))
            assert [len(g) for g in groups] == [8, 6, 6, 6] and cuts == [(None, 2), (2, 1), (1, 0), (0, None)]
            probes = fused_scores.train_probes(scorer.lengths(train), plan.train_micro, plan.growth)
            monkeypatch.setattr(fused_scores._Discarded, "store",
                                lambda self, index, gradient: taken.append(tuple(gradient.shape)))
            for group, cut in zip(groups, cuts):
                ran.clear(), preconditioned.clear(), taken.clear()
                scorer.probe_runs(queries, train, plan, group, cut)
                top = len(scorer.blocks) - 1 if cut[0] is None else cut[0]
                assert ran == [*range(top + 1)] * (1 + len(probes)), cut
                assert sorted(preconditioned) == sorted(group), cut
                assert len(taken) == (0 if cut[1] is None else 1 + len(probes)), cut
    finally:
        for handle in handles:
            handle.remove()
        undo()


def test_passes_from_kept_gradients_are_planned_with_their_own_layers_memory(deeper, monkeypatch):
    """Working memory of `per_layer` bytes for each layer a pass holds activations of (layer_span_memory), room for
    two layers' query gradients beside the whole backward's. Planned from the loss, only the top group's pass holds
    less than the whole backward (3 groups); planned for passes from kept gradients, each group's probe (its cut) leaves
    room for more modules (2 groups); planned so but declined for want of host memory, planned again from the loss
    (3). The same bits as one pass over every module, each way."""
    model, train, queries, collator = deeper
    per_query = per_query_bytes((model,))
    per_layer = 2 * per_query
    monkeypatch.setattr(fused_scores, "available_memory",
                        lambda device: int((4 * per_layer + len(queries) * per_query / 4) / fused_scores.MEMORY_HEADROOM))
    monkeypatch.setattr(FusedScorer, "working_memory", layer_span_memory(per_layer))
    groups, scores = {}, {}
    for kept in (False, True, "declined"):
        if kept == "declined":  # planned for kept gradients, which the host then has no room for
            monkeypatch.setattr(fused_scores, "available_host_memory", lambda: 0)
        timings = {}
        scores[kept] = identity_scores(deeper, timings, boundaries=bool(kept))
        groups[kept] = timings["module_groups"]
    # from the loss: 3 groups, the top one holding more; from kept gradients: 2; declined: planned from the loss again
    assert groups == {False: 3, True: 2, "declined": 3}, groups
    monkeypatch.undo()
    one_pass = identity_scores(deeper)
    assert all(torch.equal(s, one_pass) for s in scores.values())


def test_a_subset_plans_its_memory_with_the_full_runs_longest_rows(setup, monkeypatch):
    """Working memory in proportion to the longest probed training row (the demo's rows: 21-26 tokens, row 3 the
    longest). Without row 3 the longest micro-batch is shorter, so more query gradients fit beside it and the subset
    plans fewer module groups than the whole set; given the whole set as `plan_rows` (benchmark.py's subsets, with the
    full run's rows), it plans the whole set's groups."""
    model, train, queries, collator = setup
    per_query = per_query_bytes(setup)
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: int(7.5 * per_query / fused_scores.MEMORY_HEADROOM))

    def probe(self, queries, train, plan, active=None, cut=None):
        rows = train.select(range(min(plan.train_micro, len(train))))["input_ids"]
        return max(len(ids) for row in rows for ids in row) * per_query // 4
    monkeypatch.setattr(FusedScorer, "working_memory", probe)
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64

    def groups(rows, **kwargs):
        timings = {}
        fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, queries, rows, collator,
                              query_batch_size=2, train_batch_size=2, device=torch.device("cpu"), disable_tqdm=True,
                              timings=timings, **kwargs)
        return timings["module_groups"]
    subset = train.select([i for i in range(len(train)) if i != 3])
    assert groups(subset) < groups(train) == groups(subset, plan_rows=(queries, train))


def test_a_smaller_training_micro_batch_is_taken_where_it_saves_time(setup, monkeypatch):
    """Working memory proportional to the training micro-batch (one query gradient per row), room for 10.5: with 8
    rows a micro-batch, 2.5 queries' gradients fit beside it (8 queries: at least 4 module groups, one pass each);
    with 4 rows, 6.5 (2 groups); with 2 rows, 8.5 (1). At PASS_ROW_COST 7.3 the estimates are at least 30.2, then
    16.6 and 11.3: 2 rows. The floor (MIN_TRAIN_MICRO) stops the halving."""
    model, train, queries, collator = setup
    per_query = per_query_bytes(setup)
    monkeypatch.setattr(fused_scores, "MIN_TRAIN_MICRO", 2)
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: int(10.5 * per_query / fused_scores.MEMORY_HEADROOM))
    monkeypatch.setattr(FusedScorer, "working_memory",
                        lambda self, queries, train, plan, active=None, cut=None: plan.train_micro * per_query)
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64

    def run(train_batch_size):
        timings = {}
        scores = fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, queries,
                                       train, collator, query_batch_size=2, train_batch_size=train_batch_size,
                                       device=torch.device("cpu"), disable_tqdm=True, timings=timings)
        return scores, timings
    scores, timings = run(8)
    assert (timings["train_micro_batch"], timings["passes"]) == (2, 1)
    monkeypatch.setattr(fused_scores, "MIN_TRAIN_MICRO", 4)  # the floor: 4 rows, 2 passes
    floored = run(8)[1]
    assert (floored["train_micro_batch"], floored["passes"]) == (4, 2)
    # the estimated time decides, not the passes alone: with a pass costing 1 query gradient read per training row,
    # 8 rows (4 or more passes) cost at least 4 + 8/8 = 5, 4 rows (2 passes) 2 + 8/4 = 4, 2 rows (1 pass) 1 + 8/2 = 5
    monkeypatch.setattr(fused_scores, "MIN_TRAIN_MICRO", 2)
    monkeypatch.setattr(fused_scores, "PASS_ROW_COST", 1.0)
    cheapest = run(8)[1]
    assert (cheapest["train_micro_batch"], cheapest["passes"]) == (4, 2)
    monkeypatch.undo()
    # the same sums in other micro-batches: float64, only the padding of the batches differs, so the scores agree
    # to rounding (~1e-16 relative per operation), far inside 1e-10
    one_pass = identity_scores(setup)
    torch.testing.assert_close(scores, one_pass, rtol=1e-10, atol=1e-12 * one_pass.abs().max().item())


def test_too_little_memory_for_one_query_halves_the_batches_then_stops_in_one_line(setup, monkeypatch):
    model = setup[0]
    largest = max(query_gradient_bytes(fused_scores.tracked_linears(model, fused_scores.linear_module_names(model)),
                                       torch.float64).values())
    fake_memory(monkeypatch, largest // 2, 0)  # not even the largest module's gradient of one query fits
    with pytest.raises(UserError, match=r"^error: fused scores: out of GPU memory with one query and one training row "
                                        r"per micro-batch \(a pass needs .* GiB, .* GiB available\); free memory on "
                                        r"the GPU"):
        identity_scores(setup)


def test_a_query_micro_batch_that_does_not_fit_is_halved_not_the_training_one(setup, monkeypatch, caplog):
    """The working-memory probe runs out of memory on the query side (100 queries' gradients preconditioned at once
    can outweigh a training micro-batch): the query micro-batch halves, the training one stays."""
    def probe(self, queries, train, plan, active=None, cut=None):
        self.probing = "query"
        if plan.query_micro > 1:
            raise torch.OutOfMemoryError(OOM)
        self.probing = "train"
        return 0
    monkeypatch.setattr(fused_scores, "available_memory", lambda device: 100 * per_query_bytes(setup))
    monkeypatch.setattr(FusedScorer, "working_memory", probe)
    timings = {}
    identity_scores(setup, timings)
    assert (timings["query_micro_batch"], timings["train_micro_batch"], timings["out_of_memory_retries"]) == (1, 2, 1)
    assert "retrying with 1 queries per micro-batch" in caplog.text


def failing_backward(monkeypatch, fail_on: set):
    """fused_scores._backward raising torch.OutOfMemoryError on the given calls (counted from 1)."""
    calls, original = [0], fused_scores._backward

    def backward(*args, **kwargs):
        calls[0] += 1
        if calls[0] in fail_on:
            raise torch.OutOfMemoryError(OOM)
        return original(*args, **kwargs)
    monkeypatch.setattr(fused_scores, "_backward", backward)
    return calls


@pytest.mark.parametrize("fail_on", [{2}, {10}], ids=["first chunk", "second chunk"])
def test_an_out_of_memory_chunk_is_split_into_module_groups_and_redone_to_the_same_scores(setup, monkeypatch, caplog,
                                                                                         fail_on):
    """4 queries a chunk, 8 queries, one module group: an OOM in the first chunk's query side (call 2, after the
    one-query backward that records the modules' order), or in the second chunk's (call 10: 2 query batches + 6
    training batches in chunk one) halves the modules' bytes a pass holds (3 groups, at the demo model's module
    sizes) and redoes the chunk. Module groups change
    which pass adds a score's terms, not their order: equal bitwise to the run without the error."""
    direct = identity_scores(setup, max_queries_per_pass=4)
    failing_backward(monkeypatch, fail_on)
    timings = {}
    retried = identity_scores(setup, timings, max_queries_per_pass=4)
    assert torch.equal(retried, direct)
    assert (timings["out_of_memory_retries"], timings["queries_per_pass"], timings["module_groups"]) == (1, 4, 3)
    assert "fused scores: out of GPU memory (it asked for 2.00 GiB more); retrying in 3 module groups" in caplog.text


def test_a_module_groups_pass_that_runs_out_of_memory_leaves_every_module_active(setup, monkeypatch):
    """3 module groups planned (as above); an OOM in the first group's first training batch (call 6: after the
    one-query backward and 4 query batches of 2) leaves the scorer as a probe and a new plan need it: every module
    active, the query gradients freed. The redone chunk gives the scores of the run without the error."""
    per_query = per_query_bytes(setup)
    fake_memory(monkeypatch, int((5 * per_query + 3.5 * per_query) / fused_scores.MEMORY_HEADROOM), 5 * per_query)
    direct = identity_scores(setup)
    seen, original = [], FusedScorer.score_pass

    def score_pass(self, chunk, group, *args, **kwargs):
        try:
            return original(self, chunk, group, *args, **kwargs)
        except torch.OutOfMemoryError:
            seen.append((len(group) < len(self.modules), self.hooks.active == set(self.modules), len(self.query_grads)))
            raise
    monkeypatch.setattr(FusedScorer, "score_pass", score_pass)
    failing_backward(monkeypatch, {6})
    assert torch.equal(identity_scores(setup), direct)
    assert seen == [(True, True, 0)]


def test_out_of_memory_splits_the_module_groups_then_halves_the_queries():
    """The first out-of-memory error, on the training side, drops the larger micro-batches of shorter rows (no more
    passes); each after it
    halves the bytes of the largest pass: by more module groups where the largest passes hold several modules, else
    by half the queries (whose smaller gradients may share a group again); with one query left, the micro-batches;
    then one line."""
    plan = fused_scores.PassPlan(4, 2, 2, order=["a", "b", "c"], sizes={"a": 10, "b": 10, "c": 20}, growth=4)
    plan.side = "train"  # where the grown micro-batches are (an error on the query side keeps them: the next test)
    steps = []
    for _ in range(6):
        plan.shrink("fused scores", "detail", "hint")
        groups = plan.groups(plan.per_pass)
        steps.append((plan.per_pass, groups, max(sum(plan.per_pass * plan.sizes[n] for n in g) for g in groups),
                      plan.train_micro, plan.query_micro, plan.growth))
    assert steps[0] == (4, [["a", "b", "c"]], 160, 2, 2, 1)
    steps = [step[:5] for step in steps[1:]]
    assert steps == [(4, [["a", "b"], ["c"]], 80, 2, 2),  # from 160 bytes in one pass
                     (2, [["a", "b"], ["c"]], 40, 2, 2),  # c alone held 80
                     (1, [["a", "b"], ["c"]], 20, 2, 2),
                     (1, [["a", "b"], ["c"]], 20, 1, 2),
                     (1, [["a", "b"], ["c"]], 20, 1, 1)]
    assert plan.retries == 6
    with pytest.raises(UserError, match=r"^error: fused scores: out of GPU memory with one query per pass and one row "
                                        r"per batch \(detail\); hint$"):
        plan.shrink("fused scores", "detail", "hint")


def test_an_out_of_memory_error_that_never_clears_stops_in_one_line(setup, monkeypatch):
    failing_backward(monkeypatch, set(range(2, 1000)))
    with pytest.raises(UserError, match=r"^error: fused scores: out of GPU memory with one query per pass and one row per "
                                        r"batch \(it asked for 2.00 GiB more\); free memory"):
        identity_scores(setup, max_queries_per_pass=4)
    failing_backward(monkeypatch, {1})
    with pytest.raises(UserError, match=r"^error: fused scores: out of GPU memory in one query's backward \(it asked "
                                        r"for 2.00 GiB more\); free memory on the GPU"):
        identity_scores(setup, max_queries_per_pass=4)


def identity_self_scores(setup, train_batch_size=4, **kwargs):
    model, train, _, collator = setup
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64
    return fused_self_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, train, collator,
                             train_batch_size=train_batch_size, device=torch.device("cpu"), disable_tqdm=True, **kwargs)


def test_an_out_of_memory_self_influence_pass_is_redone_with_halved_micro_batches(setup, monkeypatch, caplog):
    """Batches of 4 rows: an OOM in the third micro-batch halves the micro-batches to 2 and redoes the whole pass,
    whose rows then go through in the same batches of 2 as a run asked for 2: equal bitwise."""
    direct = identity_self_scores(setup, train_batch_size=2)
    calls = failing_backward(monkeypatch, {3})
    retried = identity_self_scores(setup)
    assert calls[0] == 3 + 6  # the failed attempt's three calls, then 12 rows in micro-batches of 2
    assert torch.equal(retried, direct)
    assert "fused self-influence: out of GPU memory (it asked for 2.00 GiB more); retrying with 2 training rows" \
        in caplog.text


def test_worker_processes_collate_the_same_batches(setup):
    """DataLoader workers change where the batches are collated, not what is computed: the scores are equal
    bitwise, pairwise (several passes) and self-influence."""
    assert torch.equal(identity_scores(setup, max_queries_per_pass=3, num_workers=2),
                       identity_scores(setup, max_queries_per_pass=3))
    assert torch.equal(identity_self_scores(setup, num_workers=2), identity_self_scores(setup))


def test_loader_workers_default_to_none_on_a_cpu_and_keep_a_core_on_a_gpu(monkeypatch):
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(utils.os, "cpu_count", lambda: 3)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "unset")  # so that the undo removes what loader_workers sets
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    assert utils.loader_workers(None, torch.device("cpu")) == 0
    assert "TOKENIZERS_PARALLELISM" not in utils.os.environ
    assert utils.loader_workers(None, torch.device("cuda")) == 2
    assert utils.os.environ["TOKENIZERS_PARALLELISM"] == "false"  # before the workers fork
    assert utils.loader_workers(1, torch.device("cpu")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three torchrun processes share the three cores: no workers
    assert utils.loader_workers(None, torch.device("cuda")) == 0
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's setting stands
    assert utils.loader_workers(2, torch.device("cuda")) == 2 and utils.os.environ["TOKENIZERS_PARALLELISM"] == "true"


# --------------------------------------------------------------------------------------------
# kronfluence's stages: the batch size is halved after an out-of-memory error
# --------------------------------------------------------------------------------------------
def oom_above(monkeypatch, method: str, key: str, limit: int):
    """Analyzer.<method> raising torch.OutOfMemoryError while its batch size `key` is above `limit`."""
    original = getattr(Analyzer, method)

    def patched(self, *args, **kwargs):
        if kwargs[key] > limit:
            raise torch.OutOfMemoryError(OOM)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Analyzer, method, patched)


def factor_tensors(scores_dir):
    factors = next(scores_dir.parent.glob("factors_*"))
    return {f.name: load_file(str(f)) for f in sorted(factors.glob("*.safetensors"))}


@pytest.mark.slow
def test_factor_and_score_batches_are_halved_until_they_fit(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """Covariance and lambda fail above batch 8 (from 32: two halvings), kronfluence's scores above 4 training rows
    (by turns: training batch 16 -> 8, query batch 8 -> 4, training 8 -> 4). The result is bitwise that of a run
    given those sizes: the stage reruns from its start."""
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac"]
    direct = analyze.main([*args, "--factor_batch_size", "8", "--train_batch_size", "4", "--query_batch_size", "4",
                           "--output_dir", str(tmp_path / "direct")])
    for method in ("fit_covariance_matrices", "fit_lambda_matrices"):
        oom_above(monkeypatch, method, "per_device_batch_size", 8)
    oom_above(monkeypatch, "compute_pairwise_scores", "per_device_train_batch_size", 4)
    halved = analyze.main([*args, "--factor_batch_size", "32", "--train_batch_size", "16", "--query_batch_size", "8",
                           "--output_dir", str(tmp_path / "halved")])
    a, b = factor_tensors(direct), factor_tensors(halved)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert torch.equal(formats.load_scores(direct)[0], formats.load_scores(halved)[0])
    fitted = json.loads((halved / formats.METADATA_FILE).read_text())["fitted_in_memory"]
    assert fitted == {"factor_batch_size": 8, "train_batch_size": 4, "query_batch_size": 4}
    assert "covariance: out of GPU memory at --factor_batch_size 32 (it asked for 2.00 GiB more); retrying with " \
           "--factor_batch_size 16" in caplog.text


def test_a_stage_that_never_fits_stops_in_one_line_naming_it(tiny_checkpoint, tmp_path, monkeypatch):
    oom_above(monkeypatch, "fit_covariance_matrices", "per_device_batch_size", 0)
    with pytest.raises(UserError, match=r"^error: covariance: out of GPU memory at --factor_batch_size 1 \(it asked for "
                                        r"2.00 GiB more\); free memory on the GPU .* or lower --max_length$"):
        analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_batch_size", "4",
                      "--output_dir", str(tmp_path)])


def test_max_memory_gb_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        analyze.parse_args(["--max_memory_gb", "20"])
    assert "--max_memory_gb caps GPU memory, and this machine has no GPU; drop it" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# NaN guard
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_factor_with_nan_stops_in_one_line_naming_the_module(tiny_checkpoint, tmp_path):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(args)
    lam = next(scores_dir.parent.glob("factors_*")) / "lambda_matrix.safetensors"
    tensors = load_file(str(lam))
    module = sorted(tensors)[3]
    tensors[module][0, 0] = float("nan")
    save_file(tensors, str(lam))
    with pytest.raises(UserError, match=f"^error: the lambda factor lambda_matrix of module {module} holds NaN or infinite "
                                        f"values \\({lam}\\)"):
        analyze.main(args)


def test_an_eigendecomposition_failure_names_the_module(tiny_checkpoint, tmp_path, monkeypatch):
    """torch.linalg.eigh failing on the 128 × 128 covariances (the demo model's intermediate width) as it may on an
    ill-conditioned matrix: the message names the first such module in kronfluence's order."""
    eigh = torch.linalg.eigh

    def failing(matrix, *args, **kwargs):
        if matrix.shape[-1] == 128:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return eigh(matrix, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(UserError, match=r"^error: eigendecomposition failed for "
                                        r"roberta\.encoder\.layer\.0\.intermediate\.dense "
                                        r"\(gradient_covariance\): linalg.eigh: The algorithm failed to converge; "
                                        r"refit without --use_half_precision"):
        analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "kfac",
                      "--output_dir", str(tmp_path)])


def test_the_memory_cap_bounds_what_a_pass_plans_for(monkeypatch):
    """available_memory: the device's free memory, within --max_memory_gb less what this process reserved, plus
    what its allocator holds unused (the CUDA calls faked: 80 GiB card, 60 free, 10 reserved of which 4 in use)."""
    cuda = torch.cuda
    fraction = {}
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80 * GiB}))
    monkeypatch.setattr(cuda, "get_device_name", lambda index: "a fake GPU")
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", lambda f, index: fraction.update({index: f}))
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: 10 * GiB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: 4 * GiB)
    monkeypatch.setattr(utils, "_memory_caps", {})
    device = torch.device("cuda")
    assert utils.available_memory(device) == 66 * GiB  # 60 free + 6 cached
    utils.limit_gpu_memory(20, device)
    assert fraction == {0: 0.25} and utils.available_memory(device) == 16 * GiB  # 20 - 10 reserved + 6 cached
    with pytest.raises(UserError, match="--max_memory_gb 90 is more than the 80.0 GiB of a fake GPU; pass at most that"):
        utils.limit_gpu_memory(90, device)

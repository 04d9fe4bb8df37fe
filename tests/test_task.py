"""The kronfluence task: exact gradient identities and padding invariance."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.utils.dataset import DataLoaderKwargs

from demo import build_demo_model, build_demo_tokenizer, make_demo_dataset
from pipeline import make_collator, margins, model_logits, tokenize
from task import MultipleChoiceTask, sample_labels
from training import LENGTH_BUCKET, bucketed


@pytest.fixture(scope="module")
def tiny():
    raw = make_demo_dataset(sizes={"train": 10, "validation": 4})
    tokenizer = build_demo_tokenizer(raw)
    torch.manual_seed(0)
    model = build_demo_model(tokenizer).double().eval()
    return raw, tokenizer, model


def kronfluence_scores(model, train, queries, collator, strategy, out, dtype=torch.float64):
    task = MultipleChoiceTask()
    model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(analysis_name="t", model=model, task=task, output_dir=str(out), disable_tqdm=True, cpu=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator))
    factor_args = FactorArguments(strategy=strategy, activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                  eigendecomposition_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    torch.manual_seed(0)  # the true-Fisher labels are sampled
    analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=4, factor_args=factor_args)
    score_args = ScoreArguments(per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
    analyzer.compute_pairwise_scores("s", factors_name="f", query_dataset=queries, train_dataset=train,
                                     per_device_query_batch_size=3, per_device_train_batch_size=4, score_args=score_args)
    return analyzer.load_pairwise_scores("s")["all_modules"]


def tracked_gradient(model, loss):
    """Gradient of `loss` with respect to the weights kronfluence tracks (every nn.Linear)."""
    params = [p for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_margin_definition():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    expected = 2.0 - torch.logsumexp(torch.tensor([0.0, 1.0, -1.0]), 0)
    assert torch.allclose(margins(logits, torch.tensor([0])), expected.reshape(1))
    assert margins(logits, torch.tensor([3])).item() < 0


def test_identity_scores_equal_per_example_gradient_dot_products(tiny, tmp_path):
    raw, tokenizer, model = tiny
    train, queries = tokenize(raw["train"], tokenizer), tokenize(raw["validation"], tokenizer)
    collator = make_collator(tokenizer)
    scores = kronfluence_scores(model, train, queries, collator, "identity", tmp_path)

    task = MultipleChoiceTask()
    train_grads = torch.stack([tracked_gradient(model, task.compute_train_loss(collator([train[i]]), model))
                               for i in range(len(train))])
    query_grads = torch.stack([tracked_gradient(model, task.compute_measurement(collator([queries[i]]), model))
                               for i in range(len(queries))])
    expected = query_grads @ train_grads.T
    assert scores.shape == (len(queries), len(train))
    assert torch.allclose(scores.double(), expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def test_per_choice_gradients_are_summed():
    task = MultipleChoiceTask(num_choices=4)
    grads = torch.arange(2 * 4 * 3 * 5, dtype=torch.float64).reshape(8, 3, 5)
    out = task.post_process_per_sample_gradient("m", grads)
    assert out.shape == (2, 3, 5)
    assert torch.equal(out[1], grads[4:].sum(0))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        task.post_process_per_sample_gradient("m", grads[:6])


def test_sampled_loss_uses_model_distribution(tiny):
    raw, tokenizer, model = tiny
    batch = make_collator(tokenizer)([tokenize(raw["train"], tokenizer)[i] for i in range(4)])
    task = MultipleChoiceTask()
    true_loss = task.compute_train_loss(batch, model)
    assert torch.allclose(true_loss, F.cross_entropy(model_logits(model, batch), batch["labels"], reduction="sum"))
    torch.manual_seed(0)
    sampled = [task.compute_train_loss(batch, model, sample=True) for _ in range(20)]
    torch.manual_seed(0)  # the same draws by hand: labels from the model's softmax, not the batch's
    logits = model_logits(model, batch)
    drawn = [torch.multinomial(logits.float().softmax(-1), 1).flatten() for _ in range(20)]
    assert all(torch.equal(s, F.cross_entropy(logits, d, reduction="sum")) for s, d in zip(sampled, drawn))
    assert any(not torch.equal(d, batch["labels"]) for d in drawn)


def test_sampled_labels_are_multinomials_draws_without_its_checks(tiny, monkeypatch):
    """sample_labels draws what torch.multinomial(softmax, 1) draws, bitwise, from the same random numbers (the
    generator left in the same state), for bf16 and float32 logits, near-one-hot and flat rows; the sampled loss no
    longer calls torch.multinomial, whose checks wait for the GPU (`.item()`) in the middle of each factor batch."""
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(64, 4, generator=generator) * (0.01, 1.0, 30.0)[seed % 3]
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(seed)
            expected, after = torch.multinomial(logits.to(dtype).float().softmax(-1), 1).flatten(), torch.rand(2)
            torch.manual_seed(seed)
            assert torch.equal(sample_labels(logits.to(dtype)), expected) and torch.equal(torch.rand(2), after)
    raw, tokenizer, model = tiny
    batch = make_collator(tokenizer)([tokenize(raw["train"], tokenizer)[i] for i in range(4)])
    monkeypatch.setattr(torch, "multinomial", lambda *args, **kwargs: pytest.fail("torch.multinomial called"))
    MultipleChoiceTask().compute_train_loss(batch, model, sample=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_dynamic_padding_matches_max_length_padding(tiny, tmp_path, strategy):
    raw, tokenizer, model = tiny
    results = {}
    for pad in (False, True):
        train = tokenize(raw["train"], tokenizer, pad_to_max_length=pad)
        queries = tokenize(raw["validation"], tokenizer, pad_to_max_length=pad)
        collator = make_collator(tokenizer, pad_to_max_length=pad)
        batch = collator([queries[i] for i in range(len(queries))])
        with torch.no_grad():
            logits = model_logits(model, batch)
        results[pad] = (batch["input_ids"].shape[-1], logits,
                        kronfluence_scores(model, train, queries, collator, strategy, tmp_path / str(pad)))
    (dyn_len, dyn_logits, dyn_scores), (max_len, max_logits, max_scores) = results[False], results[True]
    assert max_len == 128 and dyn_len < 40
    # float64; padding changes the matmul shapes (and so the summation order), not the maths: ~1e-16 relative per op,
    # amplified in the scores by up to 1 / damping = 1e8 (~1e-8), inside rtol 1e-6
    assert torch.allclose(dyn_logits, max_logits, atol=1e-10)
    np.testing.assert_allclose(dyn_scores.numpy(), max_scores.numpy(), rtol=1e-6, atol=1e-8 * max_scores.abs().max().item())


def test_length_buckets_leave_logits_unchanged(tiny):
    """`train.py --torch_compile cudagraphs` pads batches to a multiple of LENGTH_BUCKET. The padding is
    masked, so the model computes the same logits (training draws dropout masks of another shape, so it
    matches only in distribution)."""

    raw, tokenizer, model = tiny
    queries = tokenize(raw["validation"], tokenizer)
    rows = [queries[i] for i in range(len(queries))]
    plain = make_collator(tokenizer)(rows)
    padded = bucketed(make_collator(tokenizer))(rows)
    assert padded["input_ids"].shape[-1] % LENGTH_BUCKET == 0
    assert padded["input_ids"].shape[-1] > plain["input_ids"].shape[-1]
    with torch.no_grad():
        torch.testing.assert_close(model_logits(model, padded), model_logits(model, plain), rtol=0, atol=1e-10)

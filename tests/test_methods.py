"""The cheaper-than-seeds ensembles: the dropout ensemble (analyze.py --dropout_ensemble) and the checkpoint
ensemble (train.py --save_epochs, then analyze.py --combine)."""

import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

import analyze
import formats
import influence
import train
from utils import UserError


def linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4, bias=False))


def test_a_dropout_mask_drops_its_share_and_scales_the_rest():
    model = linear_model()
    masks = influence.dropout_masks(model, 0.25, seed=7, member=0)
    assert sorted(masks) == ["0", "2"]  # every nn.Linear, weights only
    values = torch.cat([m.flatten() for m in masks.values()])
    assert set(values.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # float32
    assert abs((values == 0).float().mean().item() - 0.25) < 0.06  # 680 draws: 4 standard deviations
    again = influence.dropout_masks(model, 0.25, seed=7, member=0)
    other = influence.dropout_masks(model, 0.25, seed=7, member=1)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert not torch.equal(masks["0"], other["0"])


def test_masked_weights_multiply_and_restore_bitwise():
    model = linear_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = influence.dropout_masks(model, 0.5, seed=0, member=0)
    with influence.masked_weights(model, masks):
        assert torch.equal(model[0].weight, before["0.weight"] * masks["0"])
        assert torch.equal(model[0].bias, before["0.bias"])  # biases are not masked
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError), influence.masked_weights(model, masks):
        raise RuntimeError("a failing member")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class WeightSums:
    """A backend whose 'scores' are a function of the model's weights: the ensemble's arithmetic, observed."""

    writes_scores = True

    def pairwise(self, job):
        return torch.stack([p.detach().sum() for p in job.model.parameters()]).reshape(1, -1).float(), {"n": 1}

    self_influence = pairwise


def test_the_dropout_ensemble_is_the_mean_of_its_members_and_off_is_the_plain_scores(monkeypatch):
    monkeypatch.setitem(influence.BACKENDS, "sums", WeightSums())
    model = linear_model()
    job = influence.ScoringJob(None, model, influence.AnalysisConfig(scoring="sums"), "f", "s", None, None, 1, 1)
    plain, _ = influence.score(job)
    assert torch.equal(plain, WeightSums().pairwise(job)[0])  # no ensemble: the backend's scores, bitwise
    job.config = influence.AnalysisConfig(scoring="sums", dropout_ensemble=3, dropout_rate=0.3, dropout_seed=5)
    ensemble, _ = influence.score(job)
    members = []
    for member in range(3):
        with influence.masked_weights(model, influence.dropout_masks(model, 0.3, 5, member)):
            members.append(WeightSums().pairwise(job)[0].double())
    assert torch.equal(ensemble, (sum(members) / 3).float())
    assert not torch.equal(ensemble, plain)
    assert torch.equal(influence.score(job.__class__(**{**job.__dict__, "config": influence.AnalysisConfig(
        scoring="sums")}))[0], plain)  # the weights were restored


class HalvesOnce(WeightSums):
    """A backend that runs out of memory at the full train batch size and fits at half of it."""

    def __init__(self):
        self.seen = []

    def pairwise(self, job):
        self.seen.append(job.train_batch_size)
        return super().pairwise(job)[0], {"train_batch_size": min(job.train_batch_size, 4), "queries_per_pass": 1}


def test_each_dropout_member_starts_from_the_batch_sizes_that_fitted(monkeypatch):
    backend = HalvesOnce()
    monkeypatch.setitem(influence.BACKENDS, "halves", backend)
    config = influence.AnalysisConfig(scoring="halves", dropout_ensemble=3)
    _, sizes = influence.score(influence.ScoringJob(None, linear_model(), config, "f", "s", None, None, 8, 2))
    assert backend.seen == [8, 4, 4] and sizes["train_batch_size"] == 4


def test_dropout_rate_outside_zero_to_one_is_refused(capsys):
    for rate in ("0", "1", "-0.1"):
        with pytest.raises(SystemExit):
            analyze.parse_args(["--dropout_ensemble", "2", "--dropout_rate", rate])
        assert "--dropout_rate: must be between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze.parse_args(["--dropout_ensemble", "1"])
    for flags in (["--dropout_rate", "0.2"], ["--dropout_seed", "3"]):  # without an ensemble they would do nothing
        with pytest.raises(SystemExit):
            analyze.parse_args(flags)
        assert "shape the masks of --dropout_ensemble K; add it" in capsys.readouterr().err
    args = analyze.parse_args(["--dropout_ensemble", "2"])
    assert (args.dropout_rate, args.dropout_seed) == (0.1, 0)


@pytest.mark.slow
def test_a_dropout_ensemble_agrees_across_backends_and_shares_the_plain_factors(tiny_checkpoint, tmp_path):
    """kronfluence's loop and the fused pass see the same masked sub-networks (the masks are drawn on the CPU from
    the seed and the member): their ensembles agree as their plain scores do (tests/test_fused.py's tolerance)."""
    base = ["--checkpoint_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--factor_strategy", "ekfac"]
    plain = formats.load_scores(analyze.main(base))[0]
    drop = ["--dropout_ensemble", "2", "--dropout_rate", "0.2"]
    reference_dir = analyze.main(base + drop)
    fused_dir = analyze.main(base + drop + ["--scoring", "fused"])
    assert reference_dir.name.endswith("_drop2x0.2") and fused_dir.name.endswith("_drop2x0.2_fused")
    assert len(list(tmp_path.glob("*/factors_*"))) == 1  # fitted once, on the unmasked model
    reference, meta = formats.load_scores(reference_dir)
    fused = formats.load_scores(fused_dir)[0]
    assert meta["dropout_ensemble"] == 2 and meta["dropout_rate"] == 0.2
    torch.testing.assert_close(fused.double(), reference.double(), rtol=1e-5,
                               atol=1e-6 * reference.abs().max().item())
    assert (reference - plain).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.slow
def test_save_epochs_adds_the_earlier_epochs_and_keeps_the_final_model(tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("saved", ["--save_epochs"])):
        train.main([*TINY, "--num_train_epochs", "3", "--output_dir", str(tmp_path / name), *extra])
        runs[name] = load_file(str(tmp_path / name / formats.WEIGHTS_FILE))
    assert all(torch.equal(runs["plain"][k], runs["saved"][k]) for k in runs["plain"])
    assert not (tmp_path / "plain_epoch1").exists()
    saved = tmp_path / "saved"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "saved", "saved_epoch1", "saved_epoch2"]
    final = json.loads((saved / formats.METRICS_FILE).read_text())
    for epoch in (1, 2):
        directory = formats.epoch_checkpoint_dir(saved, epoch)
        args = json.loads((directory / formats.TRAINING_ARGS_FILE).read_text())
        metrics = json.loads((directory / formats.METRICS_FILE).read_text())
        assert args["epoch"] == epoch and metrics["history"] == final["history"][:epoch]
        assert args["run_id"] == json.loads((saved / formats.TRAINING_ARGS_FILE).read_text())["run_id"]
        weights = load_file(str(directory / formats.WEIGHTS_FILE))
        assert not all(torch.equal(weights[k], runs["saved"][k]) for k in weights)
    with pytest.raises(UserError, match="saved_epoch1 already holds a checkpoint"):
        train.main([*TINY, "--num_train_epochs", "3", "--output_dir", str(tmp_path / "saved"), "--save_epochs"])
    # --checkpoint_epoch 1 is the epoch-1 checkpoint's analysis, bitwise
    common = ["--factor_strategy", "identity", "--output_dir", str(tmp_path / "scores")]
    by_flag = analyze.main(["--checkpoint_dir", str(saved), "--checkpoint_epoch", "1", *common])
    assert by_flag.parent.name == "saved_epoch1"
    by_path = analyze.main(["--checkpoint_dir", str(saved) + "_epoch1", *common, "--output_dir", str(tmp_path / "s2")])
    assert torch.equal(formats.load_scores(by_flag)[0], formats.load_scores(by_path)[0])


def test_an_epoch_checkpoint_must_exist_and_belong_to_the_run(tmp_path):
    final = tmp_path / "run"
    for directory, record in ((final, {"run_id": "a", "num_train_epochs": 4}),
                              (tmp_path / "run_epoch1", {"run_id": "a", "epoch": 1}),
                              (tmp_path / "run_epoch2", {"run_id": "b", "epoch": 2})):
        directory.mkdir()
        (directory / formats.WEIGHTS_FILE).write_bytes(b"")
        (directory / formats.TRAINING_ARGS_FILE).write_text(json.dumps(record))
    assert formats.epoch_checkpoint(final, 1) == tmp_path / "run_epoch1"
    with pytest.raises(UserError, match="run_epoch2 is not the epoch-2 model of the run"):
        formats.epoch_checkpoint(final, 2)  # another run's
    with pytest.raises(UserError, match=r"no epoch-3 checkpoint of .*: its run was trained without --save_epochs; "
                                        r"retrain with --save_epochs --overwrite_output_dir"):
        formats.epoch_checkpoint(final, 3)
    with pytest.raises(UserError, match=r"trained for 4 epochs: --checkpoint_epoch takes 1 to 3 \(epoch 4 is the "):
        formats.epoch_checkpoint(final, 4)
    with pytest.raises(SystemExit):
        analyze.parse_args(["--combine", str(final), "--checkpoint_epoch", "1"])


def test_save_epochs_with_one_epoch_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args([*TINY, "--num_train_epochs", "1", "--save_epochs"])
    assert "one epoch has none" in capsys.readouterr().err


def test_a_one_checkpoint_ensemble_is_the_single_model(tmp_path):
    scores = torch.randn(3, 6)
    member = tmp_path / "m" / "scores_ekfac_n6_q3"
    formats.save_scores(member, scores)
    (member / formats.METADATA_FILE).write_text(json.dumps({
        "scores_name": "ekfac_n6_q3", "checkpoint": None, "recipe": None,
        "data_fingerprint": {"train": "t", "queries": "q", "num_train": 6, "num_queries": 3}}))
    combined = analyze.main(["--combine", str(member), "--combine_mode", "mean", "--output_dir", str(tmp_path)])
    assert torch.equal(formats.load_scores(combined)[0], scores)

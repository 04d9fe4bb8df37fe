"""Finding wrong labels: --label_noise, self-influence scores (analyze.py --self_influence), their detection quality
(detect.py) and retraining without flagged rows (train.py --exclude_rows)."""

import argparse
import json
import re
from functools import partial

import numpy as np
import pytest
from conftest import TINY

import analyze
import detect
import evaluate_lds
import formats
import metrics
import retrain
import train
from demo import build_demo_tokenizer, make_demo_dataset
from formats import TRAINING_ARGS_FILE
from pipeline import DATA_ARG_NAMES, prepare_data, resolve_data_args
from utils import UserError, run_script


def demo_data(**flags):
    args = resolve_data_args(argparse.Namespace(**{**dict.fromkeys(DATA_ARG_NAMES), "dataset": "demo", **flags}))
    raw = make_demo_dataset()
    return prepare_data(args, build_demo_tokenizer(raw), raw), raw


def test_label_noise_moves_the_given_fraction_deterministically():
    data, raw = demo_data(label_noise=0.1, label_noise_seed=3)
    again, _ = demo_data(label_noise=0.1, label_noise_seed=3)
    other, _ = demo_data(label_noise=0.1, label_noise_seed=4)
    clean, _ = demo_data()
    before, after = np.array(raw["train"]["label"]), np.array(data.raw_train["label"])
    assert len(data.corrupted_rows) == 60 == round(0.1 * len(before))
    assert np.flatnonzero(before != after).tolist() == data.corrupted_rows  # exactly those rows, each moved
    assert np.array(data.train["labels"]).tolist() == after.tolist()  # the tokenized rows carry the new labels
    assert again.corrupted_rows == data.corrupted_rows and again.raw_train["label"] == data.raw_train["label"]
    assert other.corrupted_rows != data.corrupted_rows
    assert clean.corrupted_rows == [] and clean.raw_train["label"] == raw["train"]["label"]
    # the fingerprint changes with the labels: LDS runs or factors of the clean data are not reused for these
    assert data.fingerprint["train"] != clean.fingerprint["train"]
    assert data.raw_queries["label"] == clean.raw_queries["label"]  # queries are never touched


@pytest.mark.parametrize("flags, message", [
    (["--label_noise", "1"], "argument --label_noise: must be a fraction in [0, 1), got 1"),
    (["--label_noise", "-0.1"], "argument --label_noise: must be a number >= 0"),
    (["--exclude_rows", "x.json", "--lds_num_masks", "2"], "--exclude_rows applies to fine-tuning"),
])
def test_cleaning_flags_are_checked(flags, message, capsys):
    script = retrain if "--lds_num_masks" in flags else train
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "demo", *flags])
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The demo recipe on labels 10% moved, with EKFAC (kronfluence and fused) and identity self-influence."""
    tmp = tmp_path_factory.mktemp("noisy")
    checkpoint = tmp / "noisy"
    train.main(["--dataset", "demo", "--label_noise", "0.1", "--output_dir", str(checkpoint)])
    out = {}
    for name, flags in (("ekfac", []), ("fused", ["--scoring", "fused"]), ("identity", ["--factor_strategy", "identity"])):
        out[name] = analyze.main(["--checkpoint_dir", str(checkpoint), "--self_influence", "--output_dir",
                                  str(tmp / "scores"), *flags])
    return checkpoint, out


@pytest.mark.slow
def test_noise_is_recorded_in_the_checkpoint_and_the_scores(noisy):
    checkpoint, dirs = noisy
    trained = json.loads((checkpoint / TRAINING_ARGS_FILE).read_text())
    assert trained["data"]["label_noise"] == 0.1 and trained["data"]["label_noise_seed"] == 0
    expected, _ = demo_data(label_noise=0.1)
    assert trained["label_noise_rows"] == expected.corrupted_rows
    _, fit, meta = formats.load_self_scores(dirs["ekfac"])
    assert meta["label_noise_rows"] == expected.corrupted_rows and meta["kind"] == "self_influence"
    assert fit["label"].tolist() == np.array(expected.raw_train["label"]).tolist()  # scored on the moved labels


def test_self_influence_ranks_moved_labels_first(noisy, tmp_path, capsys):
    """60 of 600 rows moved. Under chance the AUC of 60 against 540 rows has s.d. sqrt((n1 + n0 + 1) / (12 n1 n0))
    = 0.039, so 0.75 is over six s.d. above chance (the demo measures ~0.94: the threshold leaves room for other
    CPUs' rounding, which moves the scores but not the ranking this much)."""
    _, dirs = noisy
    results = detect.main(["--self_scores", str(dirs["ekfac"]), str(dirs["fused"]), str(dirs["identity"]),
                           "--output_dir", str(tmp_path)])
    methods = results["methods"]
    assert set(methods) == {"self_ekfac_nall", "self_ekfac_nall_fused", "self_identity_nall", "training_loss"}
    for name, quality in methods.items():
        assert quality["auc"] > 0.75, name
        assert quality["recall_at"]["0.1"] > 0.3, name  # chance: 0.1
        assert len(quality["flagged"]) == 60
    assert json.loads((tmp_path / formats.DETECTION_FILE).read_text())["methods"] == methods
    assert "finding the 60 moved labels among 600 training rows" in capsys.readouterr().out


def test_suspicious_rows_print_as_text(noisy, capsys):
    checkpoint, dirs = noisy
    analyze.main(["--checkpoint_dir", str(checkpoint), "--self_influence", "--output_dir",
                  str(dirs["ekfac"].parents[1]), "--num_suspicious", "5"])  # reuses the scores
    out = capsys.readouterr().out
    scores, fit, meta = formats.load_self_scores(dirs["ekfac"])
    top = int(scores.argmax())
    data, _ = demo_data(label_noise=0.1)
    row = data.raw_train[top]
    assert f"train #{top}  self-influence " in out
    ending = row[f"ending{row['label']}"]
    assert f"labelled:  {row['sent1']} | {row['sent2']} {ending}" in out
    assert out.count("  train #") == 5 and "<pad>" not in out and "<s>" not in out
    assert ("[label moved by --label_noise]" in out) == any(f"train #{r} " in out for r in meta["label_noise_rows"])


def test_detection_quality_arithmetic():
    suspicion = np.arange(10.0)  # rows 9, 8 the most suspicious
    perfect = metrics.detection_quality(suspicion, [8, 9])
    assert perfect["auc"] == 1.0 and perfect["flagged"] == [9, 8] and perfect["recall_at"]["0.1"] == 0.5
    worst = metrics.detection_quality(suspicion, [0, 1])
    assert worst["auc"] == 0.0 and worst["recall_at"]["0.1"] == 0.0
    assert metrics.detection_quality(np.zeros(10), [0, 1])["auc"] == 0.5  # ties count half


def test_detection_needs_known_wrong_labels(tiny_checkpoint, tmp_path):
    clean = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--self_influence", "--factor_strategy",
                          "identity", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="trained without label noise, so there are no known wrong labels"):
        detect.main(["--self_scores", str(clean)])
    with pytest.raises(UserError, match=r"holds self-influence scores: pass it to --self_scores"):
        evaluate_lds.main(["--scores", str(clean), "--lds_dir", str(tmp_path)])


def test_detect_refuses_a_directory_without_self_influence_in_one_line(tiny_checkpoint, tmp_path):
    """Pairwise scores, or an empty directory, stop detect.py with one line naming the directory and the way out."""
    pairwise = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                             "--output_dir", str(tmp_path / "scores")])
    (tmp_path / "empty").mkdir()
    for bad in (pairwise, tmp_path / "empty"):
        with pytest.raises(SystemExit) as exc:  # as `python detect.py` ends (utils.run_script)
            run_script(partial(detect.main, ["--self_scores", str(bad), "--output_dir", str(tmp_path / "out")]))
        assert exc.value.code == f"error: {bad} holds no self-influence scores; make them with analyze.py --self_influence"
    assert not list(tmp_path.rglob(formats.DETECTION_FILE))


def test_exclude_rows_trains_without_them(tmp_path, caplog):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([5, 0, 5, 47]))
    out = tmp_path / "ckpt"
    with caplog.at_level("INFO"):
        train.main([*TINY, "--num_train_epochs", "1", "--exclude_rows", str(rows), "--output_dir", str(out)])
    assert json.loads((out / TRAINING_ARGS_FILE).read_text())["excluded_rows"] == [0, 5, 47]
    assert "on 45 rows" in caplog.text
    for content, message in (([48], "lists rows outside the 48 training rows (1, e.g. 48)"),
                             ({"rows": [1]}, "must hold a JSON list of integer row indices"),
                             (list(range(48)), "lists every training row")):
        rows.write_text(json.dumps(content))
        with pytest.raises(UserError, match=re.escape(message)):
            train.main([*TINY, "--exclude_rows", str(rows), "--output_dir", str(tmp_path / "other")])

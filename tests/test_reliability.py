"""No silent wrong answers, no lost work: flag and input validation, locking, resume after SIGKILL."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY
from kronfluence.arguments import FactorArguments
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import analyze
import evaluate_lds
import formats
import influence
import pipeline
import retrain
import train
import training
from demo import make_demo_dataset
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL_BATCHES = ["--factor_batch_size", "8", "--train_batch_size", "8", "--query_batch_size", "4"]  # several per stage


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temporaries(directory: Path) -> list:
    """What atomic_output leaves behind only when its process is killed."""
    return sorted(str(p) for p in Path(directory).rglob("*.tmp-*"))


def tensors_of(directory: Path) -> dict:
    """file name -> {key: tensor} for every safetensors file of a directory."""
    return {f.name: load_file(str(f)) for f in sorted(Path(directory).glob("*.safetensors"))}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


# --------------------------------------------------------------------------------------------
# Flags: validated before any work, one line naming the flag and the allowed range
# --------------------------------------------------------------------------------------------
FLAG_CASES = [
    (retrain, ["--lds_num_masks", "-1"], "argument --lds_num_masks: must be 1 or more, got -1"),
    (retrain, ["--lds_num_masks", "0"], "argument --lds_num_masks: must be 1 or more, got 0"),
    (retrain, ["--lds_num_masks", "2", "--lds_repeats", "0"], "argument --lds_repeats: must be 1 or more, got 0"),
    (retrain, ["--lds_repeats", "3"], "give --lds_num_masks N (the LDS runs) or --removal_scores SCORES_DIR"),
    (train, ["--num_train_epochs", "0"], "argument --num_train_epochs: must be 1 or more, got 0"),
    (train, ["--per_device_train_batch_size", "0"], "argument --per_device_train_batch_size: must be 1 or more"),
    (train, ["--eval_batch_size", "-4"], "argument --eval_batch_size: must be 1 or more, got -4"),
    (train, ["--max_length", "0"], "argument --max_length: must be 16 or more, got 0"),
    (train, ["--learning_rate", "0"], "argument --learning_rate: must be a number > 0, got 0"),
    (train, ["--learning_rate", "nan"], "argument --learning_rate: must be a number > 0, got nan"),
    (retrain, ["--lds_num_masks", "2", "--lds_subset_fraction", "1.5"], "--lds_subset_fraction: must lie in (0, 1)"),
    (train, ["--max_train_samples", "x"], "argument --max_train_samples: expected an integer >= 0, got 'x'"),
    (analyze, ["--top_k", "0"], "argument --top_k: must be 1 or more, got 0"),
    (analyze, ["--factor_batch_size", "0"], "argument --factor_batch_size: must be 1 or more, got 0"),
    (analyze, ["--train_batch_size", "0"], "argument --train_batch_size: must be 1 or more, got 0"),
    (analyze, ["--query_batch_size", "0"], "argument --query_batch_size: must be 1 or more, got 0"),
    (analyze, ["--dataloader_num_workers", "-1"], "argument --dataloader_num_workers: must be 0 or more, got -1"),
    (analyze, ["--lambda_max_examples", "0"], "argument --lambda_max_examples: must be 1 or more, got 0"),
    (analyze, ["--covariance_max_examples", "0"], "argument --covariance_max_examples: must be 1 or more, got 0"),
    (analyze, ["--query_index", "-1"], "argument --query_index: must be 0 or more, got -1"),
    (analyze, ["--damping_factor", "0"], "argument --damping_factor: must be a positive number"),
    (evaluate_lds, ["--scores", "s", "--lds_dir", "l", "--query_index", "-1"], "--query_index: must be 0 or more"),
    (evaluate_lds, ["--scores", "s", "--lds_dir", "l", "--num_bootstrap", "0"], "--num_bootstrap: must be 1 or more"),
]


@pytest.mark.parametrize("script,flags,message", FLAG_CASES, ids=[" ".join(c[1]) for c in FLAG_CASES])
def test_bad_flags_stop_with_one_line(script, flags, message, capsys, monkeypatch):
    for module in (pipeline, train, training):  # wherever a script looks it up
        monkeypatch.setattr(module, "load_raw", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exc:
        script.main(flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and err.endswith("(see --help)\n"), err  # no usage block, no traceback


# --------------------------------------------------------------------------------------------
# No lost work: a trained checkpoint is replaced only on request
# --------------------------------------------------------------------------------------------
def test_a_checkpoint_is_never_replaced_without_overwrite_output_dir(tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    before = sha256(out / formats.WEIGHTS_FILE)
    args = [*TINY, "--num_train_epochs", "1", "--seed", "7", "--output_dir", str(out)]
    with pytest.raises(SystemExit):  # a retraining flag: train.py refuses it rather than fine-tune over the checkpoint
        train.main([*args, "--lds_num_masks", "-1"])
    with pytest.raises(UserError, match=f"{out} already holds a checkpoint .*pass --overwrite_output_dir"):
        train.main(args)
    assert sha256(out / formats.WEIGHTS_FILE) == before
    train.main([*args, "--overwrite_output_dir"])
    assert sha256(out / formats.WEIGHTS_FILE) != before
    assert json.loads((out / formats.TRAINING_ARGS_FILE).read_text())["seed"] == 7
    assert not temporaries(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------------------------
# Bad input files: one line naming the file, the row and the value, before any training
# --------------------------------------------------------------------------------------------
def demo_files(tmp_path, n_train=32, n_queries=8):
    demo = make_demo_dataset()
    paths = tmp_path / "train.csv", tmp_path / "validation.csv"
    demo["train"].select(range(n_train)).to_pandas().to_csv(paths[0], index=False)
    demo["validation"].select(range(n_queries)).to_pandas().to_csv(paths[1], index=False)
    return paths


def with_label(path: Path, row: int, value) -> None:
    frame = pd.read_csv(path)
    frame["label"] = frame["label"].astype(object)
    frame.loc[row, "label"] = value
    frame.to_csv(path, index=False)


@pytest.mark.parametrize("split,row,value,shown", [
    ("train", 5, 1.5, "1.5"), ("train", 3, "abc", "'abc'"), ("train", 4, None, "None"), ("train", 2, 4, "4"),
    ("train", 6, -1, "-1"), ("validation", 1, 1.5, "1.5"), ("validation", 7, 9, "9")])
def test_bad_labels_name_the_file_row_and_value(split, row, value, shown, tmp_path, monkeypatch):
    train_file, validation_file = demo_files(tmp_path)
    bad = train_file if split == "train" else validation_file
    with_label(bad, row, value)
    monkeypatch.setattr(train, "train_model", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError) as err:
        train.main(["--train_file", str(train_file), "--validation_file", str(validation_file),
                    "--model_name_or_path", pipeline.DEMO_MODEL, "--output_dir", str(tmp_path / "ckpt")])
    assert str(err.value) == (f"error: {bad}: row {row} has label {shown} (rows count from 0); labels must be the "
                              f"integers 0 to 3" + (" (or -1 for an unlabelled query)" if split != "train" else ""))


def test_integral_float_labels_load_as_integers_and_a_train_file_needs_labels(tmp_path):
    train_file, validation_file = demo_files(tmp_path)
    frame = pd.read_csv(train_file)
    frame["label"] = frame["label"].astype(float)  # how pandas writes a label column that had a gap
    frame.to_csv(train_file, index=False)
    raw = pipeline.load_local_files(str(train_file), str(validation_file))
    assert raw["train"]["label"] == frame["label"].astype(int).tolist()
    frame.drop(columns="label").to_csv(train_file, index=False)
    with pytest.raises(UserError, match=f"{train_file} has no label column; training rows need labels 0 to 3"):
        pipeline.load_local_files(str(train_file), str(validation_file))


def test_a_csv_cut_mid_row_is_named(tmp_path):
    train_file, validation_file = demo_files(tmp_path)
    text = train_file.read_text()
    cut = text[: text.rindex("\n", 0, len(text) - 1)] + "\n" + text.splitlines()[-1][:20]  # the last row, cut
    train_file.write_text(cut)
    with pytest.raises(UserError, match=rf"{train_file}: row 31 has no sent1 .*is the file truncated\?"):
        pipeline.load_local_files(str(train_file), str(validation_file))


def test_max_length_beyond_the_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--max_length 200 is longer than the 128 tokens the model"):
        analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--max_length", "200", "--output_dir", str(tmp_path)])


def test_hub_model_and_dataset_offline_fail_in_one_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest): the hub paths users run give one line naming what was tried and the way out."""
    train_file, validation_file = demo_files(tmp_path)
    with pytest.raises(UserError, match=r"cannot load the model FacebookAI/roberta-base \(.*\); pass a local model "
                                        r"directory with --model_name_or_path DIR") as err:
        train.main(["--train_file", str(train_file), "--validation_file", str(validation_file),
                    "--output_dir", str(tmp_path / "ckpt")])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"cannot load allenai/swag/regular from the Hugging Face hub .*--train_file"):
        pipeline.load_raw(pipeline.resolve_data_args(pipeline.parse_args([])))


# --------------------------------------------------------------------------------------------
# Analysis outputs: complete, guarded, and never mixed by concurrent runs
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kronfluence_row_caps_follow_the_data(tiny_checkpoint, tmp_path, monkeypatch):
    """kronfluence caps covariance and lambda at 100,000 rows by default, and its rows come length-sorted: on a
    larger set only the longest rows would be used. With a cap below the data (10 of 48 rows) the factors are
    those of all rows, bitwise."""
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", *SMALL_BATCHES]
    full = analyze.main([*args, "--output_dir", str(tmp_path / "full")])
    monkeypatch.setattr(influence, "FactorArguments", partial(FactorArguments, covariance_max_examples=10,
                                                            lambda_max_examples=10))
    capped = analyze.main([*args, "--output_dir", str(tmp_path / "capped")])
    factors = [d.parent / f"factors_{json.loads((d / formats.METADATA_FILE).read_text())['factors_name']}"
               for d in (full, capped)]
    assert_same_tensors(*(tensors_of(f) for f in factors))


@pytest.mark.slow
def test_fast_fits_lambda_on_its_cap_of_random_rows(tiny_checkpoint, tmp_path, monkeypatch):
    """--fast's lambda comes from at most FAST_LAMBDA_ROWS random rows (here 10 of 48): the same factors, bitwise, as
    --lambda_max_examples 10, lambda summed over 10 examples; the covariance over all 48 rows."""
    monkeypatch.setattr(influence, "FAST_LAMBDA_ROWS", 10)
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--fast", *SMALL_BATCHES]
    runs = [analyze.main([*args, *extra, "--output_dir", str(tmp_path / name)])
            for name, extra in (("fast", []), ("explicit", ["--lambda_max_examples", "10"]))]
    factors_dirs = [d.parent / f"factors_{json.loads((d / formats.METADATA_FILE).read_text())['factors_name']}"
                    for d in runs]
    factors = [tensors_of(d) for d in factors_dirs]
    assert_same_tensors(*factors)
    lambda_counts = factors[0]["num_lambda_processed.safetensors"]
    assert lambda_counts and all(v.item() == 10 for v in lambda_counts.values()), lambda_counts
    token_counts = factors[0]["num_activation_covariance_processed.safetensors"]
    # the pooler and classifier see one vector per choice of every row, the encoder every row's tokens
    assert {k for k, v in token_counts.items() if v.item() == 48 * 4} == {"classifier", "roberta.pooler.dense"}
    assert all(v.item() > 48 * 4 for k, v in token_counts.items() if "encoder" in k)
    # the cap is not in the name, so it is in the factors' record: factors with lambda fitted on other rows (an
    # earlier --fast's, on all of them) are refused rather than reused; --overwrite refits them
    record, explicit = (d / formats.METADATA_FILE for d in factors_dirs)
    saved = json.loads(record.read_text())
    assert saved["lambda_rows"] == 10 and "lambda_rows" not in json.loads(explicit.read_text())  # in its name
    record.write_text(json.dumps({k: v for k, v in saved.items() if k != "lambda_rows"}))
    with pytest.raises(UserError, match=r"computed from other lambda_rows than this run's; pass --overwrite"):
        analyze.main([*args, "--output_dir", str(tmp_path / "fast")])
    analyze.main([*args, "--output_dir", str(tmp_path / "fast"), "--overwrite"])
    assert json.loads(record.read_text())["lambda_rows"] == 10


@pytest.mark.slow
def test_the_covariance_cap_fits_the_covariance_on_random_rows(tiny_checkpoint, tmp_path):
    """--covariance_max_examples 12 of 48 rows: the covariance factors count the vectors of factor_rows' 12 random
    rows (one a choice for the classifier, every token for the encoder), lambda all 48 rows; the factors have a name
    of their own, and the same cap twice gives the same factors, bitwise."""
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", *SMALL_BATCHES]
    cap = ["--covariance_max_examples", "12"]
    runs = [analyze.main([*args, *extra, "--output_dir", str(tmp_path / name)])
            for name, extra in (("capped", cap), ("again", cap), ("full", []))]
    dirs = [d.parent / f"factors_{json.loads((d / formats.METADATA_FILE).read_text())['factors_name']}" for d in runs]
    factors = [tensors_of(d) for d in dirs]
    assert "_cov12" in dirs[0].name and "_cov" not in dirs[2].name
    assert_same_tensors(factors[0], factors[1])
    data = pipeline.prepare_data(pipeline.resolve_data_args(analyze.parse_args(args), tiny_checkpoint),
                                 pipeline.load_checkpoint(tiny_checkpoint)[1])
    covariance_rows, lambda_rows = influence.factor_rows(data.train, None, 0, 12)
    assert (len(covariance_rows), len(lambda_rows)) == (12, 48)
    tokens = sum(len(ids) for row in covariance_rows["input_ids"] for ids in row)
    counts = factors[0]["num_activation_covariance_processed.safetensors"]
    assert counts["classifier"].item() == 12 * 4
    assert {v.item() for k, v in counts.items() if "encoder" in k} == {tokens}
    assert {v.item() for v in factors[0]["num_lambda_processed.safetensors"].values()} == {48}
    full = factors[2]["num_activation_covariance_processed.safetensors"]
    assert full["classifier"].item() == 48 * 4


@pytest.mark.slow
def test_damaged_factor_and_scores_files_are_named(tiny_checkpoint, tmp_path):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(args)
    scores_file = scores_dir / formats.SCORES_FILE
    scores_file.write_bytes(scores_file.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"cannot read scores {scores_file} .*truncated\\? rerun analyze.py"):
        formats.load_scores(scores_dir)  # as evaluate_lds.py and report.py read them
    analyze.main(args)  # the fix that message names: the scores are recomputed, the factors kept
    assert formats.load_scores(scores_dir)[0].shape == (12, 48)
    lam = next(scores_dir.parent.glob("factors_*")) / "lambda_matrix.safetensors"
    lam.write_bytes(lam.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"cannot read {lam} .*truncated\\? delete .* or pass --overwrite"):
        analyze.main(args)
    analyze.main([*args, "--overwrite"])  # the fix the message names
    assert formats.load_scores(scores_dir)[0].shape == (12, 48)


def test_unfinished_scores_are_not_evaluated(tiny_checkpoint, tmp_path):
    scores_dir = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                               "--output_dir", str(tmp_path)])
    meta = json.loads((scores_dir / formats.METADATA_FILE).read_text())
    (scores_dir / formats.METADATA_FILE).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(UserError, match="from an analyze.py run that has not finished; rerun it"):
        evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(tmp_path / "runs"), "--no_plots"])


def run_analyze(*args, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def other_weights(checkpoint: Path, out: Path) -> Path:
    """A copy of `checkpoint` under the same folder name with other weights."""
    shutil.copytree(checkpoint, out)
    weights = load_file(str(out / formats.WEIGHTS_FILE))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(out / formats.WEIGHTS_FILE),
              metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_a_second_analysis_waits_for_the_lock(tiny_checkpoint, tmp_path):
    """While another run holds an output directory's lock, analyze.py waits, writing nothing, then goes on."""
    from filelock import FileLock

    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity", "--output_dir", str(tmp_path)]
    resolved = pipeline.resolve_data_args(analyze.parse_args(args), tiny_checkpoint)
    f_name = influence.AnalysisConfig.from_args(resolved).factors_name(resolved.max_train_samples)
    factors_dir = tmp_path / tiny_checkpoint.name / f"factors_{f_name}"
    lock = FileLock(factors_dir.with_name(f".{factors_dir.name}.lock"))
    lock.acquire()
    proc = run_analyze(*args)
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if "another analyze.py is writing" in line:
                break
        assert output and "waiting for it to finish" in output[-1], "".join(output)
        time.sleep(1)
        assert not factors_dir.exists() and proc.poll() is None
    finally:
        lock.release()
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert json.loads((factors_dir / formats.METADATA_FILE).read_text())["completed_stages"] == influence.FACTOR_STAGES


@pytest.mark.slow
def test_concurrent_analyses_of_two_models_never_mix(tiny_checkpoint, tmp_path):
    """Two runs at once, same checkpoint folder name (other weights) and --output_dir: one finishes, the other
    refuses the first one's outputs, and everything in the directory belongs to the one that finished."""
    models = [tmp_path / "a" / "tiny", other_weights(tiny_checkpoint, tmp_path / "b" / "tiny")]
    shutil.copytree(tiny_checkpoint, models[0])
    common = ["--factor_strategy", "ekfac", "--output_dir", str(tmp_path / "scores"), *SMALL_BATCHES]
    procs = [run_analyze("--checkpoint_dir", str(m), *common) for m in models]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "computed from other weights_sha256 than this run's" in outputs[loser], outputs[loser][-2000:]
    analysis = tmp_path / "scores" / "tiny"
    sha = sha256(models[winner] / formats.WEIGHTS_FILE)
    for meta_file in analysis.glob("*/" + formats.METADATA_FILE):
        assert json.loads(meta_file.read_text())["weights_sha256"] == sha, meta_file
    alone = analyze.main(["--checkpoint_dir", str(models[winner]), *common[:2], "--output_dir", str(tmp_path / "alone"),
                          *SMALL_BATCHES])
    assert_same_tensors(tensors_of(alone.parent / next(analysis.glob("factors_*")).name),
                        tensors_of(next(analysis.glob("factors_*"))))
    assert torch.equal(formats.load_scores(alone)[0], formats.load_scores(next(analysis.glob("scores_*")))[0])


# --------------------------------------------------------------------------------------------
# Fault injection: SIGKILL at each stage, rerun, and get the bits of an uninterrupted run
# --------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
target, how, script, args = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
import analyze, formats, influence, retrain, task, training
import kronfluence.factor.covariance, kronfluence.factor.eigen, kronfluence.score.pairwise
stage = [None]
real_seed = influence.stage_seed
def stage_seed(seed, name, rank=0):  # called as each stage starts: tells the stage
    stage[0] = name
    return real_seed(seed, name, rank)
influence.stage_seed = stage_seed
calls = [0]
def kill():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
if how == "fit":  # mid-stage: at the second training batch of the target stage (or LDS run)
    real_loss, real_train = task.MultipleChoiceTask.compute_train_loss, training.train_model
    def loss(self, *a, **k):
        calls[0] += stage[0] == target
        if calls[0] == 2: kill()
        return real_loss(self, *a, **k)
    def train_model(*a, **k):
        calls[0] += 1
        if calls[0] == 2: kill()
        return real_train(*a, **k)
    task.MultipleChoiceTask.compute_train_loss, training.train_model = loss, train_model
else:  # while saving: half of the file written, then killed
    def save(real):
        def save_file(tensors, filename, metadata=None):
            calls[0] += 1
            if stage[0] == target or (target == "run" and calls[0] == 2):
                real(tensors, filename, metadata=metadata)
                data = open(filename, "rb").read()
                open(filename, "wb").write(data[: len(data) // 2])
                kill()
            return real(tensors, filename, metadata=metadata)
        return save_file
    for module in (kronfluence.factor.covariance, kronfluence.factor.eigen, kronfluence.score.pairwise, formats, training):
        module.save_file = save(module.save_file)
{"analyze": analyze, "retrain": retrain}[script].main(args)
"""


def killed(tmp_path, target, how, script, args):
    """Run SCRIPT's main(args) in a fresh interpreter that SIGKILLs itself at the target stage."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    result = subprocess.run([sys.executable, str(killer), str(ROOT), target, how, script, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, f"not killed at {target}/{how}: {result.returncode}\n{result.stderr[-3000:]}"


ANALYSIS_KILLS = [("covariance", "fit", "kronfluence"), ("covariance", "save", "kronfluence"),
                  ("eigendecomposition", "save", "kronfluence"), ("lambda", "fit", "kronfluence"),
                  ("lambda", "save", "kronfluence"), ("scores", "fit", "kronfluence"),
                  ("scores", "save", "kronfluence"), ("scores", "save", "fused")]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
    """One analysis per scoring path, never interrupted: the bits every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return {scoring: analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--scoring", scoring, *SMALL_BATCHES,
                                   "--output_dir", str(out)]) for scoring in ("kronfluence", "fused")}


@pytest.mark.slow
@pytest.mark.parametrize("target,how,scoring", ANALYSIS_KILLS, ids=["-".join(k) for k in ANALYSIS_KILLS])
def test_analysis_killed_at_each_stage_resumes_to_the_same_bits(target, how, scoring, tiny_checkpoint, tmp_path,
                                                                uninterrupted):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--scoring", scoring, *SMALL_BATCHES,
            "--output_dir", str(tmp_path / "out")]
    killed(tmp_path, target, how, "analyze", args)
    factors_dir = next((tmp_path / "out" / tiny_checkpoint.name).glob("factors_*"))
    finished = json.loads((factors_dir / formats.METADATA_FILE).read_text())["completed_stages"]
    stages = influence.FACTOR_STAGES
    expected = stages[:stages.index(target)] if target != "scores" else stages
    assert finished == expected  # the record names exactly the stages that finished
    scores_dir = analyze.main(args)  # no flag: the unfinished stages are redone
    reference = uninterrupted[scoring]
    assert_same_tensors(tensors_of(reference.parent / factors_dir.name), tensors_of(factors_dir))
    assert torch.equal(formats.load_scores(reference)[0], formats.load_scores(scores_dir)[0])
    assert not temporaries(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fit", "save"])
def test_lds_runs_killed_mid_run_resume_to_the_same_bits(how, tmp_path):
    args = [*TINY, "--num_train_epochs", "1", "--lds_num_masks", "3"]
    reference = retrain.main([*args, "--lds_output_dir", str(tmp_path / "reference")])
    out = tmp_path / "killed"
    killed(tmp_path, "run", how, "retrain", [*args, "--lds_output_dir", str(out)])
    assert [p.name for p in out.glob("run_*")] == [reference[0].name]  # the second run was killed
    retrain.main([*args, "--lds_output_dir", str(out)])
    for ref in reference:
        with safe_open(str(ref), "pt") as a, safe_open(str(out / ref.name), "pt") as b:
            ma, mb = a.metadata(), b.metadata()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        timing = {"seconds", "started"}  # wall-clock facts of each run
        assert {k: v for k, v in ma.items() if k not in timing} == {k: v for k, v in mb.items() if k not in timing}
    assert not temporaries(out)


# --------------------------------------------------------------------------------------------
# evaluate_lds.py: checked before any output; a torchrun-trained model names the flag that matches its runs
# --------------------------------------------------------------------------------------------
def test_evaluate_checks_the_query_index_first_and_warns_on_bare_scores(tiny_checkpoint, tmp_path, caplog):
    lds_dir = tmp_path / "runs"
    retrain.main([*TINY, "--num_train_epochs", "1", "--lds_num_masks", "4", "--lds_output_dir", str(lds_dir)])
    scores_dir = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                               "--output_dir", str(tmp_path / "s")])
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="--query_index 99 is outside the 12 queries; pass one from 0 to 11"):
        evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(lds_dir), "--query_index", "99",
                           "--output_dir", str(out)])
    assert not out.exists()
    bare = tmp_path / "bare" / formats.SCORES_FILE
    bare.parent.mkdir()
    shutil.copy(scores_dir / formats.SCORES_FILE, bare)
    with caplog.at_level(logging.WARNING, logger="evaluate_lds"):
        evaluate_lds.main(["--scores", str(bare), "--lds_dir", str(lds_dir), "--no_plots", "--output_dir", str(out)])
    assert "nothing shows that the scores and the runs share their training rows" in caplog.text


@pytest.mark.slow
def test_a_model_fine_tuned_under_torchrun_is_matched_by_the_named_batch(tmp_path):
    """Fine-tuned by 2 processes × 8 rows, the model's effective batch is 16; runs made with the same flags (each
    run trains alone, batch 8) are refused with the flag that matches, and runs made with it are accepted."""
    from test_distributed import torchrun

    ckpt = tmp_path / "ckpt"
    recipe = [*TINY, "--num_train_epochs", "1", "--per_device_train_batch_size", "8"]
    torchrun("train.py", *recipe, "--output_dir", str(ckpt))
    scores_dir = analyze.main(["--checkpoint_dir", str(ckpt), "--factor_strategy", "identity",
                               "--output_dir", str(tmp_path / "s")])
    same_flags = tmp_path / "runs8"
    retrain.main([*recipe, "--lds_num_masks", "3", "--lds_output_dir", str(same_flags)])
    with pytest.raises(UserError, match=r"effective_batch_size \(16 for the scored model, 8 in the runs\).*Make the "
                                        r"runs with --per_device_train_batch_size 16"):
        evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(same_flags), "--no_plots"])
    matched = tmp_path / "runs16"
    retrain.main([*recipe[:-1], "16", "--lds_num_masks", "3", "--lds_output_dir", str(matched)])
    assert evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(matched), "--no_plots"])["num_masks"] == 3

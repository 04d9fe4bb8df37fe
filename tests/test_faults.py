"""Faults a new user or a kill can cause: an interrupted checkpoint swap, damaged or stale outputs, seeds out of
range, data that is not what the model was trained on, provenance of a resumed fit, threads, process-group waits."""

import argparse
import contextlib
import datetime
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY
from filelock import FileLock

import analyze
import demo
import evaluate_lds
import formats
import influence
import pipeline
import report
import train
import training
import utils
from demo import make_demo_dataset
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ["--factor_strategy", "identity"]


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name or ".new-" in p.name)


# --------------------------------------------------------------------------------------------
# A checkpoint swap killed at any point: a later reader or writer completes it, nothing finished is lost
# --------------------------------------------------------------------------------------------
KILL_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import utils
    path, kill_at = Path(sys.argv[1]), sys.argv[2]
    real_replace, real_remove, calls = os.replace, utils._remove, []
    def replace(src, dst):
        calls.append(src)
        if kill_at == f"rename{len(calls)}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    def remove(p):
        if kill_at == "remove_old" and str(p).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_remove(p)
    os.replace, utils._remove = replace, remove
    with utils.atomic_output(path) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,survivor", [("rename1", "old"), ("rename2", "new"), ("rename3", "new"),
                                              ("remove_old", "new")])
def test_a_directory_swap_killed_anywhere_is_completed_by_the_next_reader(kill_at, survivor, tmp_path):
    """rename1: the finished temporary is not yet marked finished, so the old directory stays (as if the kill had
    come during the writing); from rename2 on the new directory is finished and must end up in place."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "weights").write_text("old")
    result = subprocess.run([sys.executable, "-c", KILL_SWAP, str(path), kill_at], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    utils.finish_interrupted_swaps(path)
    assert (path / "weights").read_text() == survivor
    assert leftovers(tmp_path) == []


def test_train_after_a_killed_swap_keeps_the_new_checkpoint(tmp_path):
    """The reported fault: killed between the two renames, the next train.py found no directory, deleted the
    finished new one as a stale temporary and left the .old copy behind. Now it sees the new checkpoint and
    refuses to replace it."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "weights").write_text("old")
    subprocess.run([sys.executable, "-c", KILL_SWAP, str(path), "rename3"], cwd=ROOT)
    assert not path.exists()  # the interrupted state itself
    with pytest.raises(UserError, match="already holds a checkpoint"):
        train.check_output_dir(argparse.Namespace(output_dir=path, overwrite_output_dir=False, save_epochs=False))
    assert (path / "weights").read_text() == "new" and leftovers(tmp_path) == []


def test_a_checkpoint_that_appears_during_training_is_not_replaced(tmp_path, monkeypatch):
    """--overwrite_output_dir is checked again when the checkpoint is written: another run's checkpoint that
    appeared meanwhile stays, and the new one is kept beside it, named in the error."""
    out = tmp_path / "ckpt"
    real_train_model = training.train_model

    def train_then_other_run_writes(*args, **kwargs):
        result = real_train_model(*args, **kwargs)
        out.mkdir()
        (out / "other").write_text("another run's checkpoint")
        return result

    monkeypatch.setattr(train, "train_model", train_then_other_run_writes)
    with pytest.raises(UserError, match=rf"{out} appeared while this process wrote it; the result is in "
                                        rf"{out}\.new-\d+; move it .* --overwrite_output_dir") as err:
        train.main([*TINY, "--num_train_epochs", "1", "--output_dir", str(out)])
    kept = Path(str(err.value).split("the result is in ")[1].split(";")[0])
    assert (out / "other").read_text() == "another run's checkpoint"
    assert (kept / formats.WEIGHTS_FILE).is_file() and (kept / formats.TRAINING_ARGS_FILE).is_file()


# --------------------------------------------------------------------------------------------
# Scores whose files are gone or damaged are recomputed, not trusted; a refit makes older scores stale
# --------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_damaged_scores_are_recomputed_from_the_kept_factors(damage, tiny_checkpoint, tmp_path, caplog):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(args)
    before = formats.load_scores(scores_dir)[0].clone()  # not a view of the file truncated below
    for name in (formats.SCORES_FILE, formats.QUERY_FIT_FILE):
        (scores_dir / name).unlink() if damage == "delete" else truncate(scores_dir / name)
    caplog.clear()
    caplog.set_level("INFO")
    assert analyze.main(args) == scores_dir
    assert "reusing the finished factor stages" in caplog.text and "recomputing the scores" in caplog.text
    assert "covariance: ekfac factors" not in caplog.text  # the factors were kept
    assert torch.equal(formats.load_scores(scores_dir)[0], before)
    assert formats.readable_safetensors(scores_dir / formats.QUERY_FIT_FILE)


def test_damaged_self_influence_files_are_recomputed(tiny_checkpoint, tmp_path, caplog):
    args = ["--checkpoint_dir", str(tiny_checkpoint), *IDENTITY, "--self_influence", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(args)
    before = formats.load_self_scores(scores_dir)[0].clone()
    truncate(scores_dir / formats.TRAIN_FIT_FILE)
    caplog.clear()
    analyze.main(args)
    assert "recomputing the scores" in caplog.text
    assert torch.equal(formats.load_self_scores(scores_dir)[0], before)


@pytest.mark.slow
def test_each_factor_stage_records_how_it_ran_and_scores_from_an_older_fit_are_redone(tiny_checkpoint, tmp_path,
                                                                                       caplog):
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    kron_dir = analyze.main(common)
    factors_dir = next(kron_dir.parent.glob("factors_*"))
    fit = json.loads((factors_dir / formats.METADATA_FILE).read_text())
    assert sorted(fit["stages"]) == sorted(influence.FACTOR_STAGES)
    for stage in influence.FACTOR_STAGES:
        how = fit["stages"][stage]
        assert how["world_size"] == 1 and how["cpu_threads"] == torch.get_num_threads()
        assert set(how["versions"]) == {"torch", "transformers", "kronfluence"}
        assert (how["factor_batch_size"] is None) == (stage == "eigendecomposition")
        assert how["seconds"] >= 0 and how["peak_gpu_memory_gib"] is None  # no GPU here
    assert json.loads((kron_dir / formats.METADATA_FILE).read_text())["factors_fit_id"] == fit["fit_id"]
    # another scores directory refits the shared factors with --overwrite: the first scores are now stale
    analyze.main([*common, "--scoring", "fused", "--overwrite"])
    refit = json.loads((factors_dir / formats.METADATA_FILE).read_text())["fit_id"]
    assert refit != fit["fit_id"]
    caplog.clear()
    analyze.main(common)
    assert "come from an earlier fit of these factors" in caplog.text
    assert json.loads((kron_dir / formats.METADATA_FILE).read_text())["factors_fit_id"] == refit


@pytest.mark.slow
def test_a_resumed_fit_keeps_its_id(tiny_checkpoint, tmp_path):
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(common)
    record = next(scores_dir.parent.glob("factors_*")) / formats.METADATA_FILE
    fit = json.loads(record.read_text())
    record.write_text(json.dumps({**fit, "completed_stages": ["covariance"]}))  # as a kill during the lambda stage
    analyze.main(common)
    resumed = json.loads(record.read_text())
    assert resumed["fit_id"] == fit["fit_id"] and resumed["stages"]["covariance"] == fit["stages"]["covariance"]


# --------------------------------------------------------------------------------------------
# Data that is not what the model was trained on
# --------------------------------------------------------------------------------------------
def write_demo_csvs(directory: Path, first_row: int = 0, n_train: int = 48, n_queries: int = 12) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    demo = make_demo_dataset()
    demo["train"].select(range(first_row, first_row + n_train)).to_pandas().to_csv(directory / "train.csv",
                                                                                   index=False)
    demo["validation"].select(range(n_queries)).to_pandas().to_csv(directory / "validation.csv", index=False)


@pytest.mark.slow
def test_relative_data_paths_are_stored_resolved_and_other_rows_are_refused(tmp_path, monkeypatch):
    """Trained from one directory with relative paths; analysed from another where the same relative path names
    other rows: the checkpoint names the files it was trained on, and rows that differ are refused in one line
    unless --allow_other_train_rows."""
    write_demo_csvs(tmp_path / "a" / "data")
    write_demo_csvs(tmp_path / "b" / "data", first_row=100)
    ckpt = tmp_path / "ckpt"
    monkeypatch.chdir(tmp_path / "a")
    train.main(["--train_file", "data/train.csv", "--validation_file", "data/validation.csv", "--model_name_or_path",
                pipeline.DEMO_MODEL, "--num_train_epochs", "1", "--output_dir", str(ckpt)])
    saved = json.loads((ckpt / formats.TRAINING_ARGS_FILE).read_text())["data"]
    assert saved["train_file"] == str(tmp_path / "a" / "data" / "train.csv")
    monkeypatch.chdir(tmp_path / "b")
    common = ["--checkpoint_dir", str(ckpt), *IDENTITY, "--output_dir", str(tmp_path / "scores")]
    analyze.main(common)  # the checkpoint's own (absolute) paths: the rows it was trained on
    with pytest.raises(UserError, match=r"these 48 training rows \(fingerprint \w{8}\) are not the 48 rows .* was "
                                        r"trained on .* pass --allow_other_train_rows") as err:
        analyze.main([*common, "--train_file", "data/train.csv", "--validation_file", "data/validation.csv"])
    assert "\n" not in str(err.value)
    other = analyze.main([*common[:-1], str(tmp_path / "other"), "--train_file", "data/train.csv",
                          "--validation_file", "data/validation.csv", "--allow_other_train_rows"])
    assert formats.load_scores(other)[1]["data"]["train_file"] == str(tmp_path / "b" / "data" / "train.csv")


def test_excluded_rows_are_part_of_the_data_every_later_script_sees(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text("[0, 5, 47]")
    ckpt = tmp_path / "ckpt"
    train.main([*TINY, "--num_train_epochs", "1", "--exclude_rows", str(rows), "--output_dir", str(ckpt)])
    fingerprint = json.loads((ckpt / formats.TRAINING_ARGS_FILE).read_text())["data_fingerprint"]
    assert fingerprint["num_train"] == 45 and fingerprint["excluded_rows"] == 3
    scores_dir = analyze.main(["--checkpoint_dir", str(ckpt), *IDENTITY, "--output_dir", str(tmp_path / "s")])
    scores, meta = formats.load_scores(scores_dir)
    assert scores.shape == (12, 45) and meta["excluded_rows"] == [0, 5, 47]
    train_rows, _, _ = report.load_rows(meta, scores_dir)  # the report reads the same 45 rows
    full = demo.make_demo_dataset()["train"]
    assert len(train_rows) == 45 and train_rows[0] == full[1] and train_rows[4] == full[6]
    # LDS runs made on all 48 rows do not belong to these scores
    masks, margins = torch.zeros(4, 48, dtype=torch.bool).numpy(), torch.zeros(4, 12).numpy()
    runs = {"fingerprint": {**fingerprint, "num_train": 48, "train": "x"}, "recipe": meta["recipe"]}
    with pytest.raises(UserError, match=r"num_train \(45 in the scores, 48 in the runs\)"):
        evaluate_lds.check_match(scores.numpy(), meta, masks, margins, runs)


def test_excluded_rows_with_label_noise_keep_the_moved_rows_numbered_among_the_kept(tmp_path):
    rows = tmp_path / "rows.json"
    args = pipeline.resolve_data_args(pipeline.parse_args([*TINY, "--label_noise", "0.25"]))
    _, _, moved, _ = pipeline.select_rows(args, demo.make_demo_dataset())
    rows.write_text(json.dumps(moved[:2]))
    args = pipeline.resolve_data_args(pipeline.parse_args([*TINY, "--label_noise", "0.25", "--exclude_rows", str(rows)]))
    kept_rows, _, kept_moved, excluded = pipeline.select_rows(args, demo.make_demo_dataset())
    assert excluded == sorted(moved[:2]) and len(kept_moved) == len(moved) - 2
    kept = [r for r in range(48) if r not in excluded]
    assert [kept[i] for i in kept_moved] == moved[2:]


# --------------------------------------------------------------------------------------------
# Smaller faults
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flags,message", [
    (train, ["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
    (train, ["--seed", "99999999999"], "argument --seed: must be an integer from 0 to 4294967295, got 99999999999"),
    (train, ["--label_noise_seed", "-3"], "argument --label_noise_seed: must be an integer from 0 to 4294967295"),
    (analyze, ["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
    (analyze, ["--seed", "x"], "argument --seed: expected an integer from 0 to 4294967295, got 'x'"),
])
def test_seeds_out_of_range_stop_in_the_parser(script, flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        script.main(flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no output directory made


def test_a_file_with_a_header_alone_says_it_has_no_rows(tmp_path):
    write_demo_csvs(tmp_path)
    (tmp_path / "train.csv").write_text((tmp_path / "train.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=rf"^error: train file {tmp_path / 'train.csv'} has no rows"):
        pipeline.load_local_files(str(tmp_path / "train.csv"), str(tmp_path / "validation.csv"))


def test_duplicate_rows_and_cut_choices_are_counted_in_one_line(tmp_path, caplog):
    write_demo_csvs(tmp_path)
    text = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([*text, text[1], text[2], text[1]]) + "\n")  # 3 repeats
    args = pipeline.resolve_data_args(pipeline.parse_args(["--train_file", str(tmp_path / "train.csv"),
                                                          "--validation_file", str(tmp_path / "validation.csv"),
                                                          "--max_length", "16"]))
    raw = pipeline.load_raw(args)
    _, tokenizer = pipeline.load_pretrained(pipeline.DEMO_MODEL, raw)
    with caplog.at_level("INFO", logger="pipeline"):
        data = pipeline.prepare_data(args, tokenizer, raw)
    longest = pipeline.longest_choices(data.train)
    assert (longest <= 16).all() and (longest == 16).sum() == len(data.train)  # every demo row is over 16 tokens
    lines = [r.message for r in caplog.records if r.message.startswith("data:")]
    assert lines == ["data: 3 training rows repeat an earlier row; 51 training and 12 query rows reach "
                     "--max_length 16 tokens in a choice (their text is cut there)"]
    caplog.clear()
    args.max_length = 128
    with caplog.at_level("INFO", logger="pipeline"):
        pipeline.prepare_data(args, tokenizer, raw)
    assert [r.message for r in caplog.records if r.message.startswith("data:")] == [
        "data: 3 training rows repeat an earlier row; 0 training and 0 query rows reach --max_length 128 tokens in "
        "a choice (their text is cut there)"]


def recipe(**changes):
    return {"model": "tiny-roberta", "effective_batch_size": 16, "learning_rate": "0.001", "weight_decay": "0.001",
            "num_train_epochs": "10", "seed": "1004", "lr_scheduler": "constant", **changes}


@pytest.mark.parametrize("ours,theirs,fix", [
    (recipe(), recipe(learning_rate="0.0001"), "Make the runs with the scored model's training flags "
                                                "(--learning_rate 0.001)"),
    (recipe(effective_batch_size=32), recipe(), "Make the runs with --per_device_train_batch_size 32"),
    (recipe(effective_batch_size=None), recipe(), "Make the runs with the batch size the scored model was "
                                                  "fine-tuned with (its checkpoint, from an older train.py"),
])
def test_a_recipe_mismatch_names_the_flags_that_fix_it(ours, theirs, fix):
    fingerprint = {"num_train": 4, "num_queries": 2, "train": "t", "queries": "q"}
    with pytest.raises(UserError) as err:
        evaluate_lds.check_match(torch.zeros(2, 4).numpy(), {"data_fingerprint": fingerprint, "recipe": ours},
                                 torch.zeros(3, 4).numpy(), torch.zeros(3, 2).numpy(),
                                 {"fingerprint": fingerprint, "recipe": theirs})
    assert fix in str(err.value) and "data flags" not in str(err.value) and "None" not in str(err.value).split(". ")[1]


def test_cpu_runs_default_to_one_thread_unless_omp_num_threads_says_otherwise(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        utils.configure_cpu_threads()
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        utils.configure_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_process_group_outlasts_the_longest_lock_wait(monkeypatch):
    """Under torchrun with NCCL, rank 0 may wait for another analysis's lock while the other ranks wait in a
    collective; NCCL's default timeout (10 minutes) aborted them. The group's timeout covers the wait."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(analyze.dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    analyze.init_process_group()
    assert calls[0] == ("set_device", 1) and calls[1][0] == "nccl"
    assert calls[1][1] > analyze.LOCK_WAIT > datetime.timedelta(minutes=10)


def test_a_lock_held_past_the_longest_wait_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(analyze, "LOCK_WAIT", datetime.timedelta(seconds=0.2))
    directory = tmp_path / "scores_x"
    held = FileLock(directory.with_name(f".{directory.name}.lock"))
    held.acquire()
    with pytest.raises(UserError, match=r"another analyze.py has been writing .*scores_x for 0:00:00.2"):
        with contextlib.ExitStack() as stack:
            analyze.output_lock(directory, stack)
    held.release()


def test_concurrent_recoveries_take_turns(tmp_path):
    """Recovery and swaps of one path run under a lock on its directory: a second caller waits while another holds
    it (two recoveries acting on one listing could delete the directory the first had just moved into place)."""
    import threading

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)
        open(sys.argv[2], "w").close()
        while not os.path.exists(sys.argv[3]): time.sleep(0.01)
    """), str(tmp_path), str(tmp_path / "locked"), str(tmp_path / "release")])
    while not (tmp_path / "locked").exists():
        assert holder.poll() is None
    waiter = threading.Thread(target=utils.finish_interrupted_swaps, args=(tmp_path / "ckpt",))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # blocked on the lock
    (tmp_path / "release").touch()
    waiter.join(30)
    holder.wait(30)
    assert not waiter.is_alive()


def test_an_empty_output_directory_is_filled_not_refused(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    train.main([*TINY, "--num_train_epochs", "1", "--output_dir", str(out)])
    assert (out / formats.WEIGHTS_FILE).is_file() and leftovers(tmp_path) == []


def test_analyze_completes_a_killed_checkpoint_swap_before_reading_it(tiny_checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt.with_name(f"{utils._temporary_prefix(ckpt)}{dead.stdout.strip()}.new"))
    scores_dir = analyze.main(["--checkpoint_dir", str(ckpt), *IDENTITY, "--output_dir", str(tmp_path / "s")])
    assert (ckpt / formats.WEIGHTS_FILE).is_file() and formats.load_scores(scores_dir)[0].shape == (12, 48)


def test_a_record_without_a_fit_id_gets_one_when_stages_are_refitted(tiny_checkpoint, tmp_path):
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(common)
    record = next(scores_dir.parent.glob("factors_*")) / formats.METADATA_FILE
    old = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("fit_id", "stages")}
    record.write_text(json.dumps({**old, "completed_stages": ["covariance"]}))  # an older record, cut short
    meta = {k: v for k, v in json.loads((scores_dir / formats.METADATA_FILE).read_text()).items()
            if k != "factors_fit_id"}
    (scores_dir / formats.METADATA_FILE).write_text(json.dumps(meta))
    analyze.main(common)
    fit_id = json.loads(record.read_text())["fit_id"]
    assert fit_id is not None  # so scores of the earlier lambda (no fit id either) are not taken for this fit's
    assert json.loads((scores_dir / formats.METADATA_FILE).read_text())["factors_fit_id"] == fit_id

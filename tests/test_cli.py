"""End to end: train.py → analyze.py through main([...]), the demo's properties, and bad input."""

import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from datasets import Dataset
from kronfluence.analyzer import Analyzer

import analyze
import demo
import formats
import pipeline
import retrain
import train
import training
import utils
from demo import make_demo_dataset
from influence import STRATEGIES, AnalysisConfig, factor_rows
from utils import UserError


def test_checkpoint_is_save_pretrained_directory(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_args.json", "metrics.json"} <= names
    metrics = json.loads((tiny_checkpoint / "metrics.json").read_text())
    assert {"train_loss", "train_accuracy", "validation_loss", "validation_accuracy"} <= set(metrics)
    model, tokenizer = pipeline.load_checkpoint(tiny_checkpoint)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_then_analyze_each_strategy(tiny_checkpoint, tmp_path, strategy, capsys):
    scores_dir = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", strategy,
                               "--output_dir", str(tmp_path), "--query_index", "2"])
    scores = Analyzer.load_file(scores_dir / formats.SCORES_FILE)[formats.SCORES_KEY]
    assert scores.shape == (12, 48) and torch.isfinite(scores).all()
    meta = json.loads((scores_dir / formats.METADATA_FILE).read_text())
    assert meta["factor_strategy"] == strategy and meta["shape"] == [12, 48]
    assert meta["data_fingerprint"]["num_train"] == 48
    assert set(meta["seconds"]) == {"startup", "startup_parts", "setup", "factors", "scores"} and meta["complete"] is True
    assert meta["seconds"]["startup"] > 0  # called in-process: the test process's age when the analysis started
    out = capsys.readouterr().out
    assert "QUERY #2" in out and "Top proponents" in out and "Top opponents" in out
    assert "<pad>" not in out and "<s>" not in out


def factors_name(argv, checkpoint=None) -> str:
    """The factors name analyze.py gives these flags."""
    args = pipeline.resolve_data_args(analyze.parse_args(argv), checkpoint)
    return AnalysisConfig.from_args(args).factors_name(args.max_train_samples)


def scores_name(argv) -> str:
    args = pipeline.resolve_data_args(analyze.parse_args(argv))
    return AnalysisConfig.from_args(args).scores_name(args.max_train_samples, args.num_queries)


@pytest.mark.slow
def test_factors_are_reused_and_guarded(tiny_checkpoint, tmp_path):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "kfac", "--output_dir", str(tmp_path)]
    scores_dir = analyze.main(args)
    factors_dir = scores_dir.parent / f"factors_{factors_name(args, tiny_checkpoint)}"
    stamp = {p: p.stat().st_mtime_ns for p in factors_dir.glob("*.safetensors")}
    analyze.main(args + ["--query_gradient_rank", "4"])  # new scores name, same factors
    assert stamp and stamp == {p: p.stat().st_mtime_ns for p in factors_dir.glob("*.safetensors")}
    meta = json.loads((factors_dir / formats.METADATA_FILE).read_text())
    meta["weights_sha256"] = "0" * 64
    (factors_dir / formats.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="other weights_sha256 than this run's; pass --overwrite"):
        analyze.main(args)


def test_names_encode_settings():
    base = ["--max_train_samples", "10", "--num_queries", "5"]
    names = {scores_name(base + extra)
             for extra in ([], ["--use_half_precision"], ["--query_gradient_rank", "32"], ["--factor_strategy", "kfac"],
                           ["--damping_factor", "-1"], ["--num_queries", "6"], ["--scoring", "fused"], ["--seed", "3"],
                           ["--use_half_precision", "--fp32_accumulation"], ["--lambda_max_examples", "5"],
                           ["--use_empirical_fisher"], ["--fast"], ["--dropout_ensemble", "4"],
                           ["--dropout_ensemble", "4", "--dropout_rate", "0.2"],
                           ["--dropout_ensemble", "4", "--dropout_seed", "1"], ["--covariance_max_examples", "5"])}
    assert len(names) == 16
    kfac = ["--factor_strategy", "kfac"]  # fits no lambda: a lambda subset does not make other factors
    assert factors_name(base + kfac) == factors_name(base + kfac + ["--lambda_max_examples", "5"])
    diagonal = ["--factor_strategy", "diagonal"]  # fits no covariance: a covariance subset does not make other factors
    assert factors_name(base + diagonal) == factors_name(base + diagonal + ["--covariance_max_examples", "5"])


def test_the_covariance_and_lambda_rows_are_separate_seeded_draws():
    """factor_rows: lambda's rows are seed's draw whether or not the covariance is capped (factors fitted without a
    covariance cap keep their rows), the covariance's come from a stream of their own, and each comes longest first."""
    rows = Dataset.from_dict({"row": list(range(48)), "input_ids": [[[1] * (1 + i % 7)] * 4 for i in range(48)]})
    covariance, lam = factor_rows(rows, 10, 0, 10)
    assert sorted(lam["row"]) == sorted(factor_rows(rows, 10, 0)[1]["row"]) == sorted(
        np.random.default_rng(0).choice(48, 10, replace=False).tolist())
    assert sorted(covariance["row"]) != sorted(lam["row"]) and len(covariance) == 10
    assert sorted(covariance["row"]) == sorted(factor_rows(rows, None, 0, 10)[0]["row"])  # the same draw again
    assert sorted(covariance["row"]) != sorted(factor_rows(rows, None, 1, 10)[0]["row"])  # another seed's
    assert len(factor_rows(rows, None, 0, None)[0]) == 48
    lengths = [len(row[0]) for row in covariance["input_ids"]]
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.slow
def test_demo_model_learns_and_influence_finds_its_group(demo_checkpoint, tmp_path):
    metrics = json.loads((demo_checkpoint / "metrics.json").read_text())
    assert metrics["validation_accuracy"] >= 0.6  # chance is 0.25
    scores_dir = analyze.main(["--checkpoint_dir", str(demo_checkpoint), "--output_dir", str(tmp_path)])
    scores = Analyzer.load_file(scores_dir / formats.SCORES_FILE)[formats.SCORES_KEY].float()
    raw = demo.make_demo_dataset()
    train_groups = np.array(raw["train"]["video-id"])
    query_groups = np.array(raw["validation"]["video-id"])
    top = torch.topk(scores, 10, dim=1).indices.numpy()
    precision = (train_groups[top] == query_groups[:, None]).mean()
    chance = np.mean([(train_groups == g).mean() for g in query_groups])
    print(f"demo: validation accuracy {metrics['validation_accuracy']:.3f}, "
          f"EKFAC precision@10 {precision:.3f}, chance {chance:.3f}")
    assert precision >= 3 * chance


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*python train.py --output_dir"):
        analyze.main(["--checkpoint_dir", str(tmp_path / "nothing"), "--dataset", "demo"])


def test_unknown_strategy(capsys):
    with pytest.raises(SystemExit) as exc:
        analyze.parse_args(["--factor_strategy", "newton"])
    assert exc.value.code == 2
    assert "invalid choice: 'newton'" in capsys.readouterr().err


def test_more_queries_than_split(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--num_queries 5000 asks for more queries than the split holds"):
        analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--num_queries", "5000", "--output_dir", str(tmp_path)])


def test_query_index_outside_the_queries_stops_before_any_work(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--query_index 12 is outside the 12 queries; pass one from 0 to 11"):
        analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--query_index", "12", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # no factors fitted


@pytest.mark.parametrize("lds", [False, True], ids=["fine-tune", "lds"])
def test_unlabelled_queries_stop_training_before_it_starts(lds, tmp_path, monkeypatch):
    """Margins need labels: an unlabelled query split fails at once (under DDP, one rank failing alone at its first
    validation would leave the others waiting)."""
    demo = make_demo_dataset()
    demo["train"].select(range(32)).to_csv(tmp_path / "train.csv")
    demo["validation"].select(range(8)).remove_columns("label").to_csv(tmp_path / "validation.csv")
    args = ["--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "validation.csv"),
            "--model_name_or_path", pipeline.DEMO_MODEL,
            *(["--lds_num_masks", "1", "--lds_output_dir", str(tmp_path / "lds")] if lds
              else ["--output_dir", str(tmp_path / "ckpt")])]
    for module in (train, training):
        monkeypatch.setattr(module, "train_model", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match=r"unlabelled rows \(label -1\), so margins cannot be measured"):
        (retrain if lds else train).main(args)


def test_fast_is_the_fast_combination_and_refuses_what_contradicts_it(capsys):
    args = analyze.parse_args(["--fast"])
    assert args.use_half_precision and args.fp32_accumulation and args.scoring == "fused"
    assert analyze.parse_args([]).scoring == "kronfluence" and not analyze.parse_args([]).fast
    # factor batches: kronfluence's example's 64, --fast's 256, and a given size always wins
    assert (args.factor_batch_size, analyze.parse_args([]).factor_batch_size) == (256, 64)
    assert analyze.parse_args(["--fast", "--factor_batch_size", "32"]).factor_batch_size == 32
    for extra, message in ((["--scoring", "kronfluence"], "--fast scores with --scoring fused; drop --scoring kronfluence"),
                           (["--query_gradient_rank", "8"], "--scoring fused uses full-rank query gradients")):
        with pytest.raises(SystemExit):
            analyze.parse_args(["--fast", *extra])
        assert message in capsys.readouterr().err


def test_use_ddp_outside_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(UserError, match="torchrun"):
        analyze.parse_args(["--use_ddp"])


def test_a_backend_that_needs_cuda_under_torchrun_is_refused_on_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="--scoring kronfluence under torchrun needs CUDA; on CPU use --use_ddp with "
                                        "--scoring fused"):
        analyze.parse_args(["--use_ddp"])
    assert analyze.parse_args(["--use_ddp", "--scoring", "fused"]).scoring == "fused"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["cudagraphs"]], ids=["dynamic", "cudagraphs"])
def test_torch_compile_trains_and_saves_plain_weights(tmp_path, monkeypatch, mode):
    """--torch_compile trains through the compiled module but saves the plain model (no `_orig_mod.` keys);
    with cudagraphs every training batch is padded to a multiple of LENGTH_BUCKET tokens (on CPU the CUDA
    graphs themselves are skipped by torch)."""
    from safetensors import safe_open

    lengths, real = [], pipeline.model_logits
    def recording(model, batch):  # training batches go through the compiled module, evaluation batches do not
        if hasattr(model, "_orig_mod"):
            lengths.append(batch["input_ids"].size(-1))
        return real(model, batch)

    monkeypatch.setattr(training, "model_logits", recording)
    out = tmp_path / "compiled"
    result = train.main([*TINY, "--num_train_epochs", "1", "--torch_compile", *mode, "--output_dir", str(out)])
    bucketed = [n % training.LENGTH_BUCKET == 0 for n in lengths]
    assert lengths and all(bucketed) == bool(mode), lengths  # the demo's own lengths are not all multiples
    assert np.isfinite(result["train_loss"]) and 0 <= result["validation_accuracy"] <= 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    model, _ = pipeline.load_checkpoint(out)
    assert model.config.num_hidden_layers == 2


def test_dataloader_workers_train_identical_weights(tmp_path):
    """Collating in worker processes changes nothing: same batches in the same order in every epoch, same
    dropout draws, same weights."""
    from safetensors.torch import load_file

    weights = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        train.main([*TINY, "--num_train_epochs", "2", "--dataloader_num_workers", workers, "--output_dir", str(out)])
        weights.append(load_file(str(out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("script", ["train", "analyze"])
def test_scripts_configure_attention(script, tiny_checkpoint, tmp_path):
    """Every entry point that runs the model applies utils.configure_attention: cuDNN out of attention (a plan
    per padded length) and a padding mask that is never read on the host (a GPU sync per forward)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    before = torch.backends.cuda.cudnn_sdp_enabled()
    utils.configure_attention(cudnn=True, mask_check=True)  # PyTorch's and transformers' defaults
    try:
        if script == "train":
            train.main([*TINY, "--num_train_epochs", "1", "--output_dir", str(tmp_path / "ckpt")])
        else:
            analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                          "--output_dir", str(tmp_path / "scores")])
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_mask
    finally:
        utils.configure_attention(cudnn=before, mask_check=True)


def test_the_analysis_runs_with_its_data_out_of_the_collectors_reach(tiny_checkpoint, tmp_path, monkeypatch):
    """analyze.py builds its data with the cycle collector off and runs the analysis with every object alive at its
    start frozen (gc.freeze), so that the gc.collect() calls of kronfluence and of the memory planner, and the
    collector's own full collections, do not walk the tokenized rows; both undone when main returns."""
    seen = {}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            seen[name] = (gc.isenabled(), gc.get_freeze_count())
            return function(*args, **kwargs)
        monkeypatch.setattr(analyze, name, wrapped)

    spy("prepare_data", analyze.prepare_data)
    spy("run_analysis", analyze.run_analysis)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                  "--output_dir", str(tmp_path)])
    assert seen["prepare_data"] == (False, 0)
    enabled, frozen = seen["run_analysis"]
    assert enabled and frozen > 10_000  # the interpreter's, the libraries' and the analysis's objects
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_fast_records_where_its_stages_spend_their_time(tiny_checkpoint, tmp_path):
    """analyze.py --fast records its start-up's parts, per factor stage the calls and seconds of the fast kernels'
    hooks, and for the scores each training pass's seconds and the parts of the passes (utils.HookTimes): one
    contraction and one per-example gradient per module and training micro-batch, one per-example gradient and
    preconditioning per module and query micro-batch, the parts inside the micro-batches that hold them. On a CPU a
    part's device seconds are its host seconds."""
    batches = ["--factor_batch_size", "8", "--train_batch_size", "8", "--query_batch_size", "4"]
    scores_dir = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac", "--fast",
                               *batches, "--output_dir", str(tmp_path)])
    saved = json.loads((scores_dir / formats.METADATA_FILE).read_text())
    factors = json.loads((scores_dir.parent / f"factors_{saved['factors_name']}" / formats.METADATA_FILE).read_text())
    modules = len(Analyzer.load_file(next((scores_dir.parent / f"factors_{saved['factors_name']}").glob(
        "activation_covariance.safetensors"))))
    stages = factors["stages"]
    # the GPU's busy share of each stage (utils.GpuBusy): none on a CPU
    assert [how["gpu_busy_share"] for how in stages.values()] == [None] * 3 and saved["gpu_busy_share"] is None
    assert set(stages["covariance"]["hooks"]) == {"covariance: activations", "covariance: gradients"}
    assert set(stages["lambda"]["hooks"]) == {"lambda: activations", "lambda: rotated squares"}
    assert stages["eigendecomposition"]["hooks"] == {}
    for part in (*stages["covariance"]["hooks"].values(), *stages["lambda"]["hooks"].values()):
        assert part["calls"] % modules == 0 and part["calls"] > 0
        assert part["device_seconds"] == part["host_seconds"] <= stages["covariance"]["seconds"] + stages["lambda"][
            "seconds"]
    seconds = saved["seconds"]
    assert len(seconds["scores_pass_seconds"]) == saved["fitted_in_memory"]["passes"]
    # each pass's figure is rounded to 10 ms (≤ 5 ms off), their total to 1 ms and then to 10 ms (≤ 5.5 ms off);
    # 1e-9 for the float sum itself
    passes = len(seconds["scores_pass_seconds"])
    assert abs(sum(seconds["scores_pass_seconds"]) - seconds["scores_train_seconds"]) <= 0.005 * passes + 0.0055 + 1e-9
    # the planning before the first pass, the query side and the passes: within the scores stage (three figures
    # rounded to 1 ms and then to 10 ms, ≤ 5.5 ms off each, and the stage's to 10 ms: 0.0215 s; 1e-9 for the float sum)
    assert 0 < seconds["scores_planning_seconds"] and (seconds["scores_planning_seconds"] + seconds["scores_query_seconds"]
                                                       + seconds["scores_train_seconds"] <= seconds["scores"] + 0.0215
                                                       + 1e-9)
    hooks = {name: part["calls"] for name, part in seconds["scores_hooks"].items()}
    train_batches, query_batches = hooks["training micro-batches"], hooks["query micro-batches"]
    assert hooks["contraction"] == modules * train_batches
    assert hooks["query preconditioning"] == modules * query_batches
    assert hooks["per-example gradients"] == modules * (train_batches + query_batches)
    parts = seconds["scores_hooks"]
    assert parts["contraction"]["host_seconds"] <= parts["training micro-batches"]["host_seconds"]
    startup = seconds["startup_parts"]  # the process's start (here pytest's) to the data, in three parts
    assert set(startup) == {"imports", "checkpoint", "data"} and min(startup.values()) >= 0
    # "imports" and "startup" read the kernel's uptime, in steps of 10 ms (utils.process_seconds): the difference
    # of two readings is off by < 10 ms; each of the four figures is rounded to 10 ms (< 5 ms each)
    assert sum(startup.values()) <= seconds["startup"] + 0.01 + 4 * 0.005 + 1e-9  # 1e-9: the float sum


def test_the_gpu_busy_share_is_the_mean_of_the_samples_taken_while_the_block_runs(monkeypatch):
    """utils.GpuBusy: a thread reads the utilization every INTERVAL seconds from the block's start to its end, and the
    share is the readings' mean over 100; with no reading to take (a CPU, no NVML: the first reading fails) there is
    no thread and no share; a reading that fails later keeps the samples before it."""
    monkeypatch.setattr(utils.GpuBusy, "INTERVAL", 0.001)

    def run(readings, samples):
        deadline = time.monotonic() + 30  # a loaded machine's thread still gets its turns well inside this

        def sample():
            value = next(readings)
            if isinstance(value, Exception):
                raise value
            return value
        with utils.GpuBusy(torch.device("cpu"), sample=sample) as busy:
            while len(busy.samples) < samples and time.monotonic() < deadline:
                time.sleep(0.001)
        assert len(busy.samples) >= samples and (busy._thread is None or not busy._thread.is_alive())
        return busy

    assert run(iter([0, 60, 80, 60, 80] + [70] * 10**6), 4).share == pytest.approx(0.7, abs=0.005)  # 60, 80, 60, 80,
    # and 70s after them: the mean stays 0.70
    assert run(iter([0, 40, 40, RuntimeError("NVML: driver gone")]), 2).share == 0.4
    unavailable = run(iter([ModuleNotFoundError("pynvml")]), 0)
    assert unavailable.share is None and unavailable._thread is None
    with utils.GpuBusy(torch.device("cpu")) as busy:  # a CPU: nothing to read
        pass
    assert busy.share is None and busy._thread is None


def test_hook_times_read_each_parts_device_events_once_they_have_passed(monkeypatch):
    """utils.HookTimes on a GPU: two CUDA events a part, read without waiting every RESOLVE_EVERY parts (those
    that have passed; the others stay for later) and all of them, waiting, at take(). Fake events stand in for CUDA's:
    each part lasts 2 ms on the device, and only events marked as passed answer query()."""
    passed = set()

    class Event:
        made = 0

        def __init__(self, enable_timing):
            assert enable_timing
            self.id, Event.made = Event.made, Event.made + 1

        def record(self):
            pass

        def query(self):
            return self.id in passed

        def synchronize(self):
            passed.add(self.id)

        def elapsed_time(self, end):
            assert end.id == self.id + 1 and end.id in passed  # its own start's, once passed
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(utils.HookTimes, "RESOLVE_EVERY", 4)
    times = utils.HookTimes()
    for _ in range(3):
        with times.part("a", cuda=True):
            pass
    passed.update({1, 3})  # the first two parts' end events have passed, the third's not
    with times.part("b", cuda=True):
        pass
    assert times.device == {"a": 0.004} and len(times._pending) == 2  # read: the passed ones; kept: the others
    with times.part("b", cuda=False):  # a CPU part: its host seconds
        pass
    summary = times.take()
    assert summary["a"] == {"calls": 3, "host_seconds": summary["a"]["host_seconds"], "device_seconds": 0.006}
    b = summary["b"]  # a GPU part's 2 ms and a CPU part's host seconds (rounded to 1 ms)
    assert b["calls"] == 2 and 0.002 <= b["device_seconds"] <= 0.002 + b["host_seconds"] + 0.001
    assert times.take() == {} and not times._pending


@pytest.mark.slow
def test_train_does_not_import_kronfluence():
    """Each retraining process imports train.py; kronfluence (about 3 s of each process's start-up on the GPU host,
    results/startup_probe.py) is only needed by analyze.py."""
    code = "import sys, train; print('kronfluence' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(train.__file__).parent, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_library_logs_only_with_verbose(tiny_checkpoint, tmp_path):
    """By default a command prints its own lines and the result; kronfluence's INFO (argument dumps, the model repr)
    and its GradScaler FutureWarning appear only with --verbose."""
    args = [sys.executable, "analyze.py", "--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "ekfac"]
    quiet, verbose = (subprocess.run([*args, "--output_dir", str(tmp_path / name), *extra], cwd=Path(analyze.__file__).parent,
                                     capture_output=True, text=True, timeout=300, check=True)
                      for name, extra in (("quiet", []), ("verbose", ["--verbose"])))
    for result, shown in ((quiet, False), (verbose, True)):
        output = result.stdout + result.stderr
        assert "Top proponents" in output and "covariance: ekfac factors" in output
        assert ("TrackedLinear(" in output) == shown and ("GradScaler" in output) == shown


@pytest.mark.slow
def test_readme_demo_command_runs_and_prints_a_short_result(tmp_path):
    """The README's first set-up command, as a user runs it: it exits 0 and, progress bars aside, prints about 40
    lines ending with the query and its top proponents and opponents (no library INFO dumps, no warnings)."""
    readme = (Path(train.__file__).parent / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.endswith("# 1. the demo")).split("#")[0].strip()
    assert command == "python train.py --dataset demo && python analyze.py --checkpoint_dir checkpoints/demo"
    for script in Path(train.__file__).parent.glob("*.py"):  # a fresh checkout's scripts, outputs in tmp_path
        (tmp_path / script.name).write_text(script.read_text())
    result = subprocess.run(command.replace("python ", f"{sys.executable} "), shell=True, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+%\|", line)]  # tqdm bars: "NN%|"
    assert len(lines) <= 60, "\n".join(lines)
    assert not [line for line in lines if "Warning" in line or "kronfluence." in line], "\n".join(lines)  # its loggers
    text = "\n".join(lines)
    assert "validation accuracy" in text and "QUERY #0" in text and "Top opponents" in text
    # the README's excerpt is this output: its lines in this form, and the query (the data's, the same everywhere).
    # The numbers (accuracy, rows, scores) are the excerpt's on the CPU it ran on only: CPUs round differently in their
    # vector kernels (AVX2, AVX-512), and a training run amplifies that (0.865 to 0.915 seen on the demo)
    excerpt = readme.split("```text\n", 1)[1].split("```", 1)[0]
    forms = (r"__main__: validation accuracy 0\.\d{4}; checkpoint in checkpoints/demo$",
             r"__main__: scores \(200, 600\) \(queries × train\) in scores/demo/scores_ekfac_nall_qall$",
             r"Top proponents \(training examples that most raise this query's margin\):\n  \+ train #\d+ +score \+\S+\n    \S",
             r"Top opponents \(training examples that most lower it\):\n  - train #\d+ +score \S+\n    \S")
    for form in forms:
        assert len(re.findall(form, excerpt, re.M)) == 1 and len(re.findall(form, text, re.M)) == 1, (form, text)
    query = r"QUERY #0 \(correct choice\)\n.*"
    assert re.findall(query, excerpt) == re.findall(query, text), text

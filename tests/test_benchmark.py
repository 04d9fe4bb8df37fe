"""benchmark.py end to end on a tiny architecture (CPU), and its length sorting keeps score order."""

import json
import numpy as np
import pytest

import benchmark
from pipeline import build_demo_tokenizer, make_demo_dataset


@pytest.fixture
def swag_files(tmp_path):
    from test_pipeline import swag_frame

    frame = swag_frame(24)
    frame["sent1"] = [f"Someone opens door {'and walks ' * (i % 5)}{i}." for i in range(24)]  # varied lengths
    frame.to_csv(tmp_path / "train.csv", index=False)
    return str(tmp_path / "train.csv")


def test_benchmark_runs_and_reports(tmp_path, swag_files):
    tok = tmp_path / "tokenizer"  # the demo's byte-level BPE stands in for roberta-base's
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = tmp_path / "bench.json"
    result = benchmark.main(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
                             "--num_train", "16", "--num_queries", "4", "--num_fast_queries", "8", "--train_steps", "1",
                             "--architecture", "tiny", "--configs", "reference_fp32", "fastest",
                             "--output", str(out), "--work_dir", str(tmp_path / "w")])
    saved = json.loads(out.read_text())
    assert saved["reference_fp32_full_scale_s"] == result["configs"]["reference_fp32"]["full_scale_seconds"] > 0
    fp32 = saved["configs"]["reference_fp32"]
    assert fp32["vs_reference_fp32"]["pearson"] == pytest.approx(1.0)
    scale = 73_536 / 16
    expected = (fp32["covariance"]["seconds"] + fp32["lambda"]["seconds"]) * scale + fp32["eigendecomposition"]["seconds"] \
        + fp32["scores"]["seconds"] * scale * 20  # 2,000 queries in passes of 100, 4 queries in one pass here
    assert fp32["full_scale_seconds"] == pytest.approx(expected, rel=0.01, abs=0.2)
    assert saved["configs"]["fastest"]["settings"]["queries_per_train_pass"] == 1000
    assert saved["training"]["retrain_50pct_swag_steps"] == 3 * (36_768 // 16)


def test_length_order_sorts_by_longest_choice():
    rows = {"input_ids": [[[1] * 5, [1] * 2], [[1] * 3, [1]], [[1] * 9, [1]]]}
    assert list(benchmark.length_order(rows)) == [1, 0, 2]
    assert np.array_equal(np.argsort(benchmark.length_order(rows)), [1, 0, 2])

"""analyze.py --combine: ensembles of several models' scores."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import analyze
import formats
from metrics import lds_per_query
from utils import UserError


def fake_scores_dir(root, name, scores, train="t" * 64, queries="q" * 64, seed=1):
    out = root / name / "scores_ekfac_n6_q3"
    out.mkdir(parents=True)
    save_file({formats.SCORES_KEY: scores}, str(out / formats.SCORES_FILE))
    (out / formats.METADATA_FILE).write_text(json.dumps({
        "scores_name": "ekfac_n6_q3", "checkpoint": None,
        "data_fingerprint": {"train": train, "queries": queries, "num_train": scores.shape[1], "num_queries": scores.shape[0]},
        "recipe": {"learning_rate": "5e-05", "seed": str(seed)}}))
    return out


def test_standardized_mean_divides_rows_by_their_std(tmp_path):
    a, b = torch.randn(3, 6), 100 * torch.randn(3, 6)
    dirs = [fake_scores_dir(tmp_path, "m1", a), fake_scores_dir(tmp_path, "m2", b, seed=2)]
    out = analyze.main(["--combine", *map(str, dirs), "--output_dir", str(tmp_path / "out")])
    combined, meta = formats.load_scores(out)
    expected = (a / a.std(1, keepdim=True) + b / b.std(1, keepdim=True)) / 2
    assert combined.shape == (3, 6) and torch.allclose(combined, expected, atol=1e-6)
    assert out.name.startswith("scores_ekfac_n6_q3_ens2std_") and meta["combine_mode"] == "standardized"
    assert meta["recipe"] == {"learning_rate": "5e-05"}  # the seeds differ, so they are not a shared setting
    mean = analyze.main(["--combine", *map(str, dirs), "--combine_mode", "mean", "--output_dir", str(tmp_path / "out")])
    assert torch.allclose(formats.load_scores(mean)[0], (a + b) / 2)
    assert mean != out


def test_one_standardized_model_keeps_its_lds(tmp_path):
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=(3, 6))).float()
    masks = rng.random((30, 6)) < 0.5
    margins = masks @ scores.numpy().T + rng.normal(scale=0.5, size=(30, 3))
    out = analyze.main(["--combine", str(fake_scores_dir(tmp_path, "m", scores)), "--output_dir", str(tmp_path)])
    np.testing.assert_allclose(lds_per_query(masks, margins, formats.load_scores(out)[0].numpy()),
                               lds_per_query(masks, margins, scores.numpy()))


def test_combining_different_data_or_shapes_is_refused(tmp_path):
    a = fake_scores_dir(tmp_path, "a", torch.randn(3, 6))
    with pytest.raises(UserError, match="scores other train rows than"):
        analyze.main(["--combine", str(a), str(fake_scores_dir(tmp_path, "b", torch.randn(3, 6), train="x" * 64))])
    with pytest.raises(UserError, match=r"has \(3, 5\) scores but .* has \(3, 6\)"):
        analyze.main(["--combine", str(a), str(fake_scores_dir(tmp_path, "c", torch.randn(3, 5)))])
    flat = torch.randn(3, 6)
    flat[1] = 2.0
    with pytest.raises(UserError, match="all equal; use --combine_mode mean"):
        analyze.main(["--combine", str(a), str(fake_scores_dir(tmp_path, "d", flat))])
    with pytest.raises(UserError, match="no scores at"):
        analyze.main(["--combine", str(a), str(tmp_path / "missing")])

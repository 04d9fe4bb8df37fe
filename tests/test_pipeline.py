"""Loading SWAG-schema files, the demo data, and clear errors on bad input."""

import gzip
import shutil

import pandas as pd
import pytest
from datasets import Dataset

import demo
import formats
import pipeline
import utils
from demo import make_demo_dataset
from pipeline import load_local_files, resolve_data_args, tokenize
from utils import UserError


def swag_frame(n, labelled=True):
    frame = pd.DataFrame({
        "video-id": [f"v{i}" for i in range(n)], "fold-ind": list(range(n)), "startphrase": ["x"] * n,
        "sent1": [f"Someone opens door {i}." for i in range(n)], "sent2": ["Someone"] * n, "gold-source": ["gold"] * n,
        **{f"ending{j}": [f"walks through door {i + j}." for i in range(n)] for j in range(4)},
    })
    if labelled:
        frame["label"] = [i % 4 for i in range(n)]
    return frame


def test_local_csv_json_parquet_and_gzip_load(tmp_path):
    frame = swag_frame(6)
    frame.to_csv(tmp_path / "train.csv", index=False)
    with open(tmp_path / "train.csv", "rb") as src, gzip.open(tmp_path / "train.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    frame.to_json(tmp_path / "val.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "val.parquet")
    for train_file, val_file in [("train.csv", "val.jsonl"), ("train.csv.gz", "val.parquet")]:
        raw = load_local_files(str(tmp_path / train_file), str(tmp_path / val_file))
        assert len(raw["train"]) == len(raw["validation"]) == 6
        assert list(raw["train"]["label"]) == [0, 1, 2, 3, 0, 1]


def test_unlabelled_test_split_loads_with_label_minus_one(tmp_path):
    swag_frame(3).to_csv(tmp_path / "train.csv", index=False)
    swag_frame(5, labelled=False).to_csv(tmp_path / "test.csv", index=False)
    raw = load_local_files(str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))
    assert list(raw["validation"]["label"]) == [-1] * 5


def test_missing_columns_are_listed(tmp_path):
    swag_frame(3).drop(columns=["sent2", "ending3"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match=r"missing the SWAG column\(s\) sent2, ending3"):
        load_local_files(str(tmp_path / "bad.csv"), str(tmp_path / "bad.csv"))


def test_truncated_and_missing_files_give_one_line_errors(tmp_path):
    swag_frame(50).to_csv(tmp_path / "train.csv", index=False)
    with open(tmp_path / "train.csv", "rb") as src, gzip.open(tmp_path / "full.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    data = (tmp_path / "full.csv.gz").read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated") as err:
        load_local_files(str(tmp_path / "cut.csv.gz"), str(tmp_path / "train.csv"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_local_files(str(tmp_path / "nope.csv"), str(tmp_path / "train.csv"))
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(UserError, match="expected a .csv"):
        load_local_files(str(tmp_path / "train.csv"), str(tmp_path / "train.txt"))


def test_demo_is_deterministic_and_has_latent_groups():
    a, b = make_demo_dataset(), make_demo_dataset()
    assert a["train"][:20] == b["train"][:20]
    groups = set(a["train"]["video-id"])
    assert groups == set(demo.DEMO_SCRIPTS)
    row = a["train"][0]
    assert set(formats.REQUIRED_COLUMNS + [formats.LABEL_COLUMN]) <= set(row)


def test_tokenization_pairs_context_with_each_ending():
    raw = make_demo_dataset(sizes={"train": 4})["train"]
    tokenizer = demo.build_demo_tokenizer({"train": raw})
    tokenized = tokenize(raw, tokenizer)
    row = tokenized[0]
    assert len(row["input_ids"]) == formats.NUM_CHOICES
    texts = pipeline.decode_choices(tokenizer, row)
    for text, ending in zip(texts, formats.ENDING_COLUMNS):
        context, second = text.split(" | ")
        assert context == raw[0]["sent1"]
        assert second == f"{raw[0]['sent2']} {raw[0][ending]}"
    long = tokenize(raw, tokenizer, max_length=12)
    assert max(len(ids) for choices in long["input_ids"] for ids in choices) == 12


def test_rust_encoding_gives_the_tokenizers_own_rows(tmp_path):
    """A fast tokenizer's pairs are encoded by a copy of its Rust tokenizer: the rows equal `tokenizer(first, second,
    truncation=True, max_length=...)`'s bit for bit (token types included where the model takes them, pairs cut
    longest first from either side, special tokens split or not), and the user's tokenizer keeps its own truncation
    setting. A tokenizer whose Rust part cannot be copied (a component written in Python) or whose class encodes in
    Python goes through `tokenizer(...)` itself."""
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import BertTokenizerFast

    raw = make_demo_dataset(sizes={"train": 40})["train"]
    raw = raw.map(lambda row, i: {"sent2": f"[SEP] </s> {row['sent2']}"} if i % 3 == 0 else {}, with_indices=True)
    first = [row["sent1"] for row in raw for _ in formats.ENDING_COLUMNS]
    second = [f"{row['sent2']} {row[end]}" for row in raw for end in formats.ENDING_COLUMNS]
    roberta = demo.build_demo_tokenizer({"train": raw})
    words = sorted({w for row in raw for c in formats.REQUIRED_COLUMNS for w in str(row[c]).lower().replace(".", " .").split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[: len(words) // 2]]))

    def bert(**kwargs):  # half the words unknown: [UNK]s too
        return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), **kwargs)

    def same_rows(tokenizer, max_length):
        tokenized = tokenize(raw, tokenizer, max_length=max_length)
        ours = tokenized.to_dict()
        theirs = tokenizer(first, second, truncation=True, max_length=max_length)
        assert set(ours) == {*tokenizer.model_input_names, "labels"}
        for name in tokenizer.model_input_names:
            assert [ids for choices in ours[name] for ids in choices] == theirs[name], (type(tokenizer), name)
        # stored as datasets stores the lists of the rows themselves (its integer types for each input name)
        assert tokenized.features == Dataset.from_dict(ours).features

    # datasets' cache tells the special-token settings apart (its fingerprint of the tokenizing function)
    assert tokenize(raw, bert())._fingerprint != tokenize(raw, bert(split_special_tokens=True))._fingerprint
    for tokenizer in (roberta, bert(), bert(truncation_side="left"), bert(split_special_tokens=True)):
        for max_length in (128, 12, 7):  # 12 and 7 cut most pairs, both sides at 7
            same_rows(tokenizer, max_length)
        assert tokenizer.backend_tokenizer.truncation["max_length"] == 7  # tokenizer(...)'s own setting, not ours
        tokenizer.backend_tokenizer.no_truncation()
        tokenize(raw, tokenizer, max_length=9)
        assert tokenizer.backend_tokenizer.truncation is None

    class Spaces:  # a pre-tokenizer written in Python: its tokenizer cannot be copied
        def pre_tokenize(self, pretok):
            pretok.split(lambda i, s: s.split(" ", "removed"))

    class Lowered(type(roberta)):  # a class that encodes in Python
        def _encode_plus(self, text, text_pair=None, **kwargs):
            return super()._encode_plus([t.lower() for t in text], [t.lower() for t in text_pair], **kwargs)

    custom = bert()
    custom.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(Spaces())
    lowered = Lowered(tokenizer_object=roberta.backend_tokenizer, **{k: getattr(roberta, k) for k in (
        "bos_token", "eos_token", "sep_token", "cls_token", "unk_token", "pad_token", "mask_token")})
    for tokenizer in (custom, lowered):
        same_rows(tokenizer, 12)
    padded = tokenize(raw, roberta, max_length=40, pad_to_max_length=True)  # through tokenizer(...) itself
    assert {len(ids) for choices in padded["input_ids"] for ids in choices} == {40}


def test_more_queries_than_the_split_holds(capsys):
    args = resolve_data_args(pipeline.parse_args(["--dataset", "demo", "--num_queries", "100000"]))
    with pytest.raises(UserError, match=r"--num_queries 100000 asks for more queries than the split holds \(200\)"):
        pipeline.main(["--dataset", "demo", "--num_queries", "100000"])
    assert args.max_train_samples == 0  # demo default: all rows
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--dataset", "demo", "--max_train_samples", "-3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument --max_train_samples: must be 0 or more, got -3 "
                                            "(see --help)\n")
    assert resolve_data_args(pipeline.parse_args([])).max_train_samples == pipeline.REFERENCE_NUM_TRAIN


@pytest.fixture
def default_attention():
    """transformers' own sdpa mask and cuDNN setting, restored afterwards (configure_attention is process-wide)."""
    import torch

    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    utils.configure_attention(cudnn=cudnn, mask_check=True)
    yield
    utils.configure_attention(cudnn=cudnn, mask_check=True)


def test_configure_attention_never_reads_the_padding_mask(default_attention, monkeypatch):
    """After configure_attention the forward never evaluates the padding mask on the host (the GPU sync that
    transformers' skip check costs), and the logits are those of transformers' default, padded or not."""
    import torch
    import transformers.masking_utils as masking_utils

    tokenizer = demo.build_demo_tokenizer(make_demo_dataset())
    torch.manual_seed(0)
    model = demo.build_demo_model(tokenizer).eval()
    ids = torch.randint(5, len(tokenizer), (2, 4, 12))
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][:, :, 9:] = 0
    unpadded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    checks = []
    check = masking_utils._ignore_bidirectional_mask_sdpa
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: checks.append(1) or check(*a, **k))
    with torch.no_grad():
        before = [model(**batch).logits for batch in (padded, unpadded)]
        assert len(checks) == 2  # transformers' default reads the mask once per forward
        utils.configure_attention()
        after = [model(**batch).logits for batch in (padded, unpadded)]
    assert len(checks) == 2
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.equal(before[0], after[0])
    # unpadded, transformers skipped the mask and SDPA ran another kernel: float32 rounding (2^-24 relative per op
    # over a few hundred terms) on logits of order 1, inside 1e-6
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=1e-6)

"""The embedded demo: a SWAG-style dataset of short scene scripts with their own vocabulary, a BPE tokenizer
trained on it and a two-layer RoBERTa, all built offline in seconds (`--dataset demo`)."""

import random

import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForMultipleChoice,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaTokenizerFast,
)

from formats import (
    CONTEXT_COLUMN,
    ENDING_COLUMNS,
    HEADER_COLUMN,
    LABEL_COLUMN,
    MAX_LENGTH,
    NUM_CHOICES,
    QUERY_SPLIT,
    REQUIRED_COLUMNS,
    TRAIN_SPLIT,
)

DEMO_SCRIPTS = {  # script: (setups, places, actions, objects)
    "kitchen": (["chops the onions", "heats the pan"], ["in the kitchen", "at the stove"],
                ["tastes", "serves"], ["the hot soup", "the fresh bread"]),
    "beach": (["waxes the surfboard", "spreads a towel"], ["on the beach", "by the waves"],
              ["paddles out to", "swims toward"], ["the big wave", "the coral reef"]),
    "gym": (["chalks both hands", "loads the barbell"], ["in the gym", "by the rack"],
            ["lifts", "presses"], ["the heavy weights", "the kettlebell"]),
    "garden": (["pulls the weeds", "fills the watering can"], ["in the garden", "near the greenhouse"],
               ["plants", "prunes"], ["the tomato vines", "the rose bushes"]),
    "concert": (["tunes the guitar", "adjusts the microphone"], ["on the stage", "under the spotlight"],
                ["strums", "sings"], ["the loud chorus", "the slow ballad"]),
    "workshop": (["measures the plank", "clamps the board"], ["in the workshop", "at the workbench"],
                 ["saws", "sands"], ["the oak board", "the table leg"]),
    "ski": (["buckles the boots", "lowers the goggles"], ["on the slope", "at the summit"],
            ["carves down", "slaloms through"], ["the steep run", "the powder field"]),
    "market": (["picks up a basket", "greets the vendor"], ["at the market", "by the stall"],
               ["haggles over", "pays for"], ["the ripe apples", "the spice jars"]),
}

DEMO_NAMES = ["Anna", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas",
              "Kemal", "Lena", "Marco", "Nadia", "Oscar", "Priya"]

DEMO_SIZES = {TRAIN_SPLIT: 600, QUERY_SPLIT: 200}

DEMO_SEED = 2024


def _demo_ending(rng: random.Random, script: str) -> str:
    _, _, actions, objects = DEMO_SCRIPTS[script]
    return f"{rng.choice(actions)} {rng.choice(objects)}."


def make_demo_dataset(sizes: dict = DEMO_SIZES, seed: int = DEMO_SEED) -> DatasetDict:
    """A deterministic SWAG-schema dataset. Each row belongs to a latent scene script (stored in
    `video-id`): the context comes from the script, the gold ending continues it, and the three
    distractors continue other scripts. A tiny model can learn it, and a query's most influential
    training rows should come from its own script."""
    rng = random.Random(seed)
    names = list(DEMO_SCRIPTS)
    splits = {}
    for split, n in sizes.items():
        rows = {c: [] for c in ["video-id", "fold-ind", "startphrase", "gold-source", *REQUIRED_COLUMNS, LABEL_COLUMN]}
        for i in range(n):
            script = names[rng.randrange(len(names))]
            setups, places, _, _ = DEMO_SCRIPTS[script]
            person = rng.choice(DEMO_NAMES)
            context = f"{person} {rng.choice(setups)} {rng.choice(places)}."
            others = rng.sample([s for s in names if s != script], NUM_CHOICES - 1)
            label = rng.randrange(NUM_CHOICES)
            endings = [_demo_ending(rng, s) for s in others]
            endings.insert(label, _demo_ending(rng, script))
            header = rng.choice([person, "Then " + person, "Next, " + person])
            for key, value in [("video-id", script), ("fold-ind", str(i)), ("gold-source", "gen"),
                               ("startphrase", f"{context} {header}"), (CONTEXT_COLUMN, context),
                               (HEADER_COLUMN, header), (LABEL_COLUMN, label)]:
                rows[key].append(value)
            for column, ending in zip(ENDING_COLUMNS, endings):
                rows[column].append(ending)
        splits[split] = Dataset.from_dict(rows)
    return DatasetDict(splits)


def demo_corpus(raw: DatasetDict):
    for split in raw.values():
        for column in REQUIRED_COLUMNS:
            yield from split[column]


def build_demo_tokenizer(raw: DatasetDict) -> RobertaTokenizerFast:
    """A byte-level BPE tokenizer trained on the demo text with `tokenizers` (nothing downloaded)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(demo_corpus(raw), vocab_size=600, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                mask_token="<mask>", model_max_length=MAX_LENGTH)


def build_demo_model(tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A two-layer RoBERTa small enough to train and analyse on a laptop CPU."""
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=MAX_LENGTH + 4,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, type_vocab_size=1)
    return AutoModelForMultipleChoice.from_config(config)

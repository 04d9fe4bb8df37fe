"""The kronfluence `Task` for 4-way multiple choice (SWAG).

    from task import MultipleChoiceTask
    task = MultipleChoiceTask(num_choices=4)

- training loss: summed cross-entropy over the batch; with `sample=True` the labels are drawn
  from the model's predictive distribution (true Fisher);
- measurement: the negative margin −(correct logit − logsumexp of the other logits), the query
  quantity whose change the scores predict (and that the LDS retraining runs record);
- attention mask: the (batch, choices, tokens) mask, so padded tokens never enter the factors;
- per-sample gradients: the model flattens the choices into the batch, so kronfluence sees one
  gradient per choice; they are summed into one gradient per example.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from kronfluence.task import Task
from torch import nn

from formats import LABELS, NUM_CHOICES
from pipeline import margins, model_logits

Batch = Dict[str, torch.Tensor]


def sample_labels(logits: torch.Tensor) -> torch.Tensor:
    """One label per row of `logits` drawn from its softmax: torch.multinomial(p, 1)'s own draw, argmax(p / q) with
    q ~ Exp(1) from the same generator (the same random numbers, the same labels), without its checks of p, which
    wait for the GPU twice in the middle of every factor batch (`.item()`) so that the host cannot queue the backward
    and the next batch ahead of the GPU. NaN logits give some label and a NaN loss, which the factors' NaN check
    reports."""
    probabilities = logits.float().softmax(dim=-1)
    return (probabilities / torch.empty_like(probabilities).exponential_(1)).argmax(dim=-1)


class MultipleChoiceTask(Task):
    enable_post_process_per_sample_gradient = True

    def __init__(self, num_choices: int = NUM_CHOICES):
        super().__init__()
        self.num_choices = num_choices

    def compute_train_loss(self, batch: Batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = model_logits(model, batch)
        if not sample:
            return F.cross_entropy(logits, batch[LABELS], reduction="sum")
        with torch.no_grad():
            sampled = sample_labels(logits)
        return F.cross_entropy(logits, sampled, reduction="sum")

    def compute_measurement(self, batch: Batch, model: nn.Module) -> torch.Tensor:
        return -margins(model_logits(model, batch), batch[LABELS]).sum()

    def get_attention_mask(self, batch: Batch) -> Optional[torch.Tensor]:
        return batch["attention_mask"]

    def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
        del module_name
        rows = gradient.size(0)
        if rows % self.num_choices:
            raise ValueError(f"per-choice gradient batch of {rows} is not a multiple of {self.num_choices} choices")
        return gradient.view(rows // self.num_choices, self.num_choices, *gradient.shape[1:]).sum(dim=1)

"""What the data side hands to a model: a batch of images and tokenised texts (and, for masked modelling and
fine-tuning, what the model predicts). Methods, the trainer and the evaluators all read this one type."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TextBatch":
        return TextBatch(self.input_ids.to(device, non_blocking=non_blocking),
                         self.attention_mask.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Batch:
    """One training batch (see bench/data/corpus.py). Rows with an image are in `images`, rows with text in `text`;
    `image_text[i]` is the text row of image i, -1 when it has none (None: images and texts are aligned
    pairs). `text_groups` marks texts that are the same caption (equal ids are positives for each other);
    `image_prompt[i]`, with paired prompts, is the text row of image i's prompt (-1 none; None: no prompts).
    Masked modelling adds `masked_text`, the same rows with hidden pieces replaced by [MASK], and
    `mlm_labels`, the hidden pieces' ids (-100 elsewhere); `mlm_rows` are the text rows MLM may mask (the
    reports, not the prompts; None: every row), the only ones a method needs to encode masked. Fine-tuning batches carry `labels`, the task's
    label vector per image; pretraining on labels (methods/supervised.py) carries them too, with `label_mask`
    saying which of them count (an uncertain or unlabelled finding does not). Methods that match image regions
    with sentences get the reports' `sentences` (one row each) and `sentence_index[t, k]`, the sentence row of
    text row t's k-th sentence (-1: none; a fixed number of columns, the method's `max_sentences`)."""

    images: torch.Tensor | None
    text: TextBatch | None
    sample_ids: list[str] = field(default_factory=list)
    image_text: torch.Tensor | None = None
    text_groups: torch.Tensor | None = None
    masked_text: TextBatch | None = None
    mlm_labels: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    mlm_rows: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    image_prompt: torch.Tensor | None = None
    sentences: TextBatch | None = None
    sentence_index: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, (torch.Tensor, TextBatch)) else x

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image rows, their text rows) of the samples that have both."""
        if self.image_text is None:
            rows = torch.arange(len(self.text), device=self.text.input_ids.device)
            return rows, rows
        has = self.image_text >= 0
        return has.nonzero().squeeze(1), self.image_text[has]

    def text_image(self) -> torch.Tensor:
        """For each text row, its image row (-1: a text-only sample); a paired image's prompt row is its image's."""
        n = len(self.text)
        out = torch.full((n,), -1, dtype=torch.long, device=self.text.input_ids.device)
        images, texts = self.pairs()
        out[texts] = images
        if self.image_prompt is not None:
            has = self.image_prompt >= 0
            out[self.image_prompt[has]] = has.nonzero().squeeze(1)
        return out

    def __len__(self) -> int:
        return len(self.sample_ids)

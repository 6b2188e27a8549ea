"""The embedded benchmark's "text side": captions and a tiny text tower, CLIP's role.

CLIP learns an image tower and a text tower so that an image lands near its caption; its
zero-shot head for a task is the text embedding of a prompt per class ("a photo of a {c}").
The embedded benchmark does the same at toy scale. A caption is a bag of words:

    <domain>  <orientation>  [class words]

- ``<domain>`` names where the image comes from (``<mnist>``, ``<eurosat>``, ...) — the
  context a web caption or a prompt template carries ("a satellite photo of ...");
- the orientation word says how the image was rotated (``upright``, ``rot90``, ...): images
  are drawn rotated during pretraining, so the backbone must describe shape and layout, not
  only colour statistics;
- the class words (``"red circle"``, ``"7"``, ...) appear only for a fixed fraction of the
  pretraining images, the way alt-texts name what a photo shows only some of the time. Words
  are shared across tasks (the digit ``7`` of MNIST, of the scikit-learn digits and of SVHN is
  one word), so concepts transfer between domains as they do in language.

The zero-shot prompt of class c of task t is ``<t> upright <c>``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ORIENTATIONS = ("upright", "rot90", "rot180", "rot270")


def class_words(name: str) -> list[str]:
    return name.replace("-", " ").split()


def caption(task: str, orientation: int, class_name: str | None) -> list[str]:
    """The caption of an image of ``task`` rotated by ``orientation`` quarter turns, naming
    ``class_name`` when given."""
    words = [f"<{task}>", ORIENTATIONS[orientation]]
    return words + (class_words(class_name) if class_name is not None else [])


class CaptionSet:
    """Every caption pretraining can use, enumerated once: (task, orientation, class or none).

    ``index(task_ids, orientations, labels)`` maps a batch to caption ids (label -1 = the
    caption does not name the class), so the contrastive loss can score each image against
    all captions at once.
    """

    def __init__(self, tasks: list[str], classes: dict[str, list[str]], orientations: int):
        self.tasks = list(tasks)
        self.captions: list[list[str]] = []
        width = max(len(classes[t]) for t in self.tasks) + 1  # last slot: no class named
        table = torch.full((len(self.tasks), orientations, width), -1, dtype=torch.long)
        for i, t in enumerate(self.tasks):
            for r in range(orientations):
                for c in [None, *range(len(classes[t]))]:
                    table[i, r, width - 1 if c is None else c] = len(self.captions)
                    self.captions.append(caption(t, r, None if c is None else classes[t][c]))
        self.table = table
        self.vocab = sorted({w for cap in self.captions for w in cap})

    def index(self, task_ids: Tensor, orientations: Tensor, labels: Tensor) -> Tensor:
        slot = torch.where(labels >= 0, labels, self.table.shape[-1] - 1)
        return self.table.to(task_ids.device)[task_ids, orientations, slot]


class TextTower(nn.Module):
    """Bag of word embeddings → GELU → linear → unit norm (a toy text encoder)."""

    def __init__(self, vocab: list[str], embed_dim: int, width: int):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.EmbeddingBag(len(vocab), width, mode="mean")
        self.proj = nn.Sequential(nn.GELU(), nn.Linear(width, embed_dim))

    def forward(self, captions: list[list[str]]) -> Tensor:
        ids, offsets = [], []
        for cap in captions:
            offsets.append(len(ids))
            ids += [self.vocab[w] for w in cap]
        dev = self.embed.weight.device
        out = self.proj(
            self.embed(torch.tensor(ids, device=dev), torch.tensor(offsets, device=dev))
        )
        return F.normalize(out, dim=-1)

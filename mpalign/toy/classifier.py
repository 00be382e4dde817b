"""The attribute classifier: the toy world's exact identity metric.

A small ``ResNetForImageClassification`` (transformers; no torchvision needed) whose 20 logits are four heads side by
side: shape (6), colour (8), texture (4) and object present (2). It is trained on subject crops of every
combination, the benchmark's held-out ones included: it is the judge, not the model under test. Inputs are
subject crops (``mpalign.toy.world.subject_crop``) as uint8 arrays; pixels are scaled to [-1, 1] here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mpalign.toy.world import ATTRIBUTES

HEADS = {**{name: len(values) for name, values in ATTRIBUTES.items()}, "present": 2}


def classifier_config():
    from transformers import ResNetConfig

    labels = [f"{head}:{value}" for head, values in {**ATTRIBUTES, "present": ["no", "yes"]}.items() for value in values]
    return ResNetConfig(num_channels=3, embedding_size=24, hidden_sizes=[32, 64, 96], depths=[1, 1, 1],
                        layer_type="basic", downsample_in_first_stage=False, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})


def build_classifier():
    from transformers import ResNetForImageClassification

    return ResNetForImageClassification(classifier_config())


def load_classifier(path):
    from transformers import ResNetForImageClassification

    return ResNetForImageClassification.from_pretrained(path).float().eval()  # shipped in float16


def to_pixels(crops: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def split_heads(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(HEADS, torch.split(logits, list(HEADS.values()), dim=-1)))


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head; attribute heads only where an object is present (labels -1 otherwise)."""
    heads = split_heads(logits)
    loss = F.cross_entropy(heads["present"], labels[:, 3])
    for i, name in enumerate(ATTRIBUTES):
        loss = loss + F.cross_entropy(heads[name], labels[:, i], ignore_index=-1)
    return loss


@torch.no_grad()
def predict(model, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, 4) int: predicted shape, colour, texture indices and object present (0/1)."""
    out = []
    for start in range(0, len(crops), batch_size):
        logits = model(to_pixels(crops[start:start + batch_size])).logits
        out.append(torch.stack([h.argmax(-1) for h in split_heads(logits).values()], dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, 4), dtype=np.int64)


def attribute_accuracy(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute and all-three accuracy over the crops that hold an object."""
    present = labels[:, 3] == 1
    hits = predicted[present, :3] == labels[present, :3]
    scores = {name: float(hits[:, i].mean()) for i, name in enumerate(ATTRIBUTES)}
    scores["all"] = float(hits.all(axis=1).mean())
    scores["present"] = float((predicted[:, 3] == labels[:, 3]).mean())
    return scores


def named(labels: Sequence[int]) -> dict[str, str]:
    return {name: ATTRIBUTES[name][i] for name, i in zip(ATTRIBUTES, labels)}

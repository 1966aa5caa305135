"""Captions made from labelled Fashion-MNIST images, and the token ids of the small LLaVA's prompts.

Every caption answers one fixed question about the image ("What is in this picture?") with one of a
few templates around the class name. A caption set is built from one split only and remembers it:
training takes the ``train`` split and evaluation the ``test`` split, and each refuses the other, so
the two can never mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Fashion-MNIST's ten classes in label order, as a person would name them after "a".
CLASS_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
QUESTION = "<image>\nWhat is in this picture?"
# Answer templates; scoring reads the class name after the first one's prefix ("A photo of a").
TEMPLATES = ("A photo of a {}.", "This is a {}.", "A picture of a {}.", "It is a {}.")
SCORING_PREFIX = TEMPLATES[0].split("{}")[0].rstrip()
# Captions in the scoring template only: what the alignment trains on, so that its objective is the scoring's.
SCORING_TEMPLATES = TEMPLATES[:1]


@dataclass(frozen=True)
class CaptionSet:
    """Labelled images of one split, each with the caption it is trained on.

    Attributes:
        split: ``train`` or ``test``.
        paths: the image files, in label-file order.
        labels: ``[n]`` long class indices.
        captions: one caption per image (a template chosen with a seeded generator).
    """

    split: str
    paths: tuple[Path, ...]
    labels: Tensor
    captions: tuple[str, ...]

    def require(self, split: str, use: str) -> CaptionSet:
        """Self, or a ValueError when this set is not of ``split`` (``use`` names who asked)."""
        if self.split != split:
            raise ValueError(f"{use} reads the {split} split; these captions are made from the {self.split} split")
        return self


def caption_set(source: str, seed: int = 0, templates: Sequence[str] = TEMPLATES) -> CaptionSet:
    """Captions for ``fashion_mnist:SPLIT:N`` (the first N images of the split)."""
    from dymu_lightning.data.fashion_mnist import fashion_mnist_images, parse_source
    from dymu_lightning.data.source import labels_from_keys

    split, count = parse_source(source)
    paths = tuple(sorted(fashion_mnist_images(split, count).glob("*.png"), key=lambda p: p.stem.split("_")[1]))
    labels = labels_from_keys([p.stem for p in paths], r"^(\d+)_", source)
    return CaptionSet(split, paths, labels, make_captions(labels, seed, templates))


def make_captions(labels: Tensor, seed: int = 0, templates: Sequence[str] = TEMPLATES) -> tuple[str, ...]:
    """One caption per label: ``templates[t].format(CLASS_NAMES[label])`` with t drawn from ``seed``."""
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"every template needs exactly one '{{}}' for the class name, got {list(templates)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASS_NAMES):
        raise ValueError(f"labels must be in 0..{len(CLASS_NAMES) - 1}")
    choice = torch.randint(len(templates), (labels.numel(),), generator=torch.Generator().manual_seed(seed))
    return tuple(templates[int(t)].format(CLASS_NAMES[int(c)]) for t, c in zip(choice, labels, strict=True))


@dataclass(frozen=True)
class PromptIds:
    """The token ids around the image, for one number of image placeholders.

    Attributes:
        prompt: ``[N]`` the chat prompt up to the assistant's turn, ``patches`` placeholders in it.
        end: ``[E]`` what closes an answer (the end-of-turn token), trained as part of the caption.
    """

    prompt: Tensor
    end: Tensor


def prompt_ids(tokenizer: Any, image_token_id: int, patches: int) -> PromptIds:
    """The fixed question in the tokenizer's chat template, its ``<image>`` as ``patches`` placeholders."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    before, sep, after = text.partition("<image>")
    if not sep:
        raise ValueError("the chat template dropped the <image> placeholder")
    ids = [*_ids(tokenizer, before), *[image_token_id] * patches, *_ids(tokenizer, after)]
    end = tokenizer.eos_token_id
    return PromptIds(torch.tensor(ids), torch.tensor([] if end is None else [end], dtype=torch.long))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def class_token_ids(tokenizer: Any, names: Sequence[str] = CLASS_NAMES) -> list[list[int]]:
    """The tokens of each class name as it follows :data:`SCORING_PREFIX` (with its leading space)."""
    return [_ids(tokenizer, " " + name) for name in names]


def answer_ids(tokenizer: Any, captions: Sequence[str], end: Tensor) -> list[Tensor]:
    """Each caption's tokens followed by ``end``: what the projector is trained to make likely."""
    return [torch.cat([torch.tensor(_ids(tokenizer, c), dtype=torch.long), end]) for c in captions]


def class_first_ids(tokenizer: Any, names: Sequence[str] = CLASS_NAMES) -> tuple[int, ...]:
    """The first token of each class name after :data:`SCORING_PREFIX` (distinct for Fashion-MNIST's
    names: " t", " pair", " pull", ...), which the alignment's class loss compares."""
    return tuple(ids[0] for ids in class_token_ids(tokenizer, names))


def scoring_prefix_ids(tokenizer: Any) -> Tensor:
    """``[S]``: the answer's start before the class name ("A photo of a")."""
    return torch.tensor(_ids(tokenizer, SCORING_PREFIX), dtype=torch.long)

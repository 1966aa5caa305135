"""Which parameters an adaptation method trains.

- ``head``: only the head (a linear classifier on the encoder's features; a VLM's projector).
- ``lora``: LoRA adapters (peft) on linear layers of the tower, plus the head. The base weights stay
  frozen; the adapters start as the identity (peft zero-initialises ``lora_B``).
- ``bitfit``: the tower's biases and normalisation parameters, plus the head.

Everything else is frozen (``requires_grad=False``), so its values cannot change during training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

METHODS = ("head", "lora", "bitfit")
LORA_TARGETS = ("tower", "lm", "both")
# Default LoRA targets: the linear layers inside a module named like an attention block
# (timm: blocks.N.attn.qkv / .proj; HF ViTs: layer.N.attention.q_proj ...; Llama: self_attn.q_proj ...).
ATTENTION_PART = re.compile(r"(^|_)(attn|attention)$", re.IGNORECASE)


def attention_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules that sit inside an attention module."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(ATTENTION_PART.search(part) for part in name.split(".")[:-1]):
            names.append(name)
    return names


def lora_module_names(model: nn.Module, patterns: Sequence[str] | None, key: str) -> list[str]:
    """The linear modules LoRA goes on: those whose full name matches one of ``patterns`` (regexes),
    or the attention projections when ``patterns`` is None. A pattern matching no linear module is a
    ValueError naming ``key``."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if patterns is None:
        chosen = attention_linears(model)
        if not chosen:
            raise ValueError(f"{key}: this model has no linear layer inside an attention module; set {key}")
        return chosen
    chosen = []
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{key}: {pattern!r} is not a regular expression: {error}") from None
        matched = [name for name in linears if compiled.fullmatch(name)]
        if not matched:
            shown = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
            raise ValueError(f"{key}: {pattern!r} matches no linear module of the model (they are named like {shown})")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def add_lora(model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap the named linear modules of ``model`` in place with peft LoRA layers; returns ``model``."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("adaptation.method=lora needs peft: pip install 'dymu-lightning[finetune]'") from error

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="|".join(re.escape(name) for name in names),  # a str is matched in full by peft
        bias="none",
    )
    return inject_adapter_in_model(config, model)


def is_bitfit_parameter(module: nn.Module, name: str) -> bool:
    """A bias, or a parameter of a normalisation layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm)."""
    return name == "bias" or "norm" in type(module).__name__.lower()


def set_trainable(model: nn.Module, method: str) -> None:
    """Freeze ``model`` except what ``method`` trains in it (the head is not part of ``model``)."""
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; expected one of {METHODS}")
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if method == "lora":
                trainable = "lora_" in f"{module_name}.{name}"
            elif method == "bitfit":
                trainable = is_bitfit_parameter(module, name)
            else:
                trainable = False
            parameter.requires_grad_(trainable)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def freeze_unused(model: nn.Module, forward: Callable[[], Tensor]) -> list[str]:
    """Freeze the trainable parameters of ``model`` that ``forward()`` (a scalar of the model's
    output) does not reach, such as a host classifier the features bypass or blocks past
    ``num_blocks``: they would count as trainable and never change. Returns their names."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    grads = torch.autograd.grad(forward(), [p for _, p in trainable], allow_unused=True)
    unused = [name for (name, p), grad in zip(trainable, grads, strict=True) if grad is None]
    for name, p in trainable:
        if name in unused:
            p.requires_grad_(False)
    return unused

"""Small builders shared by tests that need one concrete model rather than the whole registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
)

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import dymu_inputs
from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds
from dymu_lightning.config import load_recipe
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.vtu import VirtualLayout
from dymu_lightning.data import write_shards
from dymu_lightning.lit.run import calibrate

# A 3-block timm ViT: 64 patches of 8 px + CLS at 64 px.
TINY_TIMM_ARCH = {
    "model_name": "vit_base_patch16_224",
    "embed_dim": 48,
    "depth": 3,
    "num_heads": 3,
    "img_size": 64,
    "patch_size": 8,
}


def tiny_timm(batch: int, seed: int = 0):
    """A 3-block timm ViT (64 patches + CLS) and ``batch`` images, half smooth, half noisy."""
    backbone = get_backbone("timm_vit")
    torch.manual_seed(seed)
    model = backbone.build(TINY_TIMM_ARCH)
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(batch, 3, 2, 2, generator=generator), size=64, mode="bilinear")
    noisy = torch.randn(batch, 3, 64, 64, generator=generator)
    pixels = torch.where(torch.arange(batch)[:, None, None, None] % 2 == 0, smooth, noisy)
    return backbone, model, pixels


# ----- calibration runs (tests/test_calibration.py, tests/test_slurm.py) ---------------------------------
def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth and noisy 64 px images (alternating), so that token counts differ between images."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        if i % 2 == 0:
            coarse = torch.rand(1, 3, 3, 3, generator=generator)
            image = torch.nn.functional.interpolate(coarse, size=64, mode="bilinear")[0]
        else:
            image = torch.rand(3, 64, 64, generator=generator)
        array = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        path = folder / f"img{i:03d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def uneven_shards(root: Path, count: int = 10) -> Path:
    """``count`` images in deliberately uneven shards of 3 (3, 3, 3, 1 for 10)."""
    write_shards(make_images(root / "images", count), root / "shards", shard_size=3)
    return root / "shards"


def recipe_file(folder: Path, shards: Path, **data) -> Path:
    """The tiny timm ViT over ``shards``, global batch 4, state saved after every step."""
    recipe = {
        "task": "calibrate",
        "out_dir": str(folder / "out"),
        "model": {"backbone": "timm_vit", "random_init": True, "arch": TINY_TIMM_ARCH},
        "data": {"shards": str(shards), "global_batch_size": 4, **data},
        "schedule": {"r": 5},
        "trainer": {"accelerator": "cpu", "progress_bar": False, "save_every_n_steps": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(recipe: Path, *overrides: str) -> ThresholdsFile:
    """Calibrate in this process."""
    return ThresholdsFile.load(calibrate(load_recipe(recipe, list(overrides))))


def assert_same_calibration(out_dir: Path, single: ThresholdsFile, world_size: int, images: int = 10) -> dict:
    """``out_dir``'s thresholds.json equals the single-process result (1e-6), records ``world_size``
    processes, and every one of the ``images`` images was seen exactly once."""
    result = json.loads((out_dir / "thresholds.json").read_text())
    assert result["world_size"] == world_size
    assert result["images_seen"] == images and result["tokens"]["images"] == images
    assert result["extra"]["index_sum"] == sum(range(images))
    assert result["extra"]["index_square_sum"] == sum(i * i for i in range(images))
    for ours, reference in zip(result["thresholds"], single.thresholds, strict=True):
        assert ours == pytest.approx(reference, abs=1e-6)
    assert result["tokens"]["mean"] == single.tokens["mean"]
    return result


# A tiny Llama-family language model, for VTU tests.
TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as in SmolLM2
    "max_position_embeddings": 128,
}
FAMILIES = {
    "llama": (LlamaConfig, LlamaModel),
    "qwen2": (Qwen2Config, Qwen2Model),
    "mistral": (MistralConfig, MistralModel),
}


def naive_reference(
    model: torch.nn.Module, rows: torch.Tensor, layout: VirtualLayout, residuals: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """Per layer: copy rows to positions, run the host's own attention module with RoPE at the
    original positions and a causal mask, average its outputs per row; norms and MLP on the rows;
    then add ``residuals[layer]`` (``[B, N_un, C]``, Qwen3-VL's DeepStack rows) if there is one."""
    length = layout.expand.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & layout.valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding queries see themselves
    additive = torch.zeros(allowed.shape, dtype=rows.dtype).masked_fill(~allowed, float("-inf"))[:, None]
    for index, layer in enumerate(model.layers):
        expanded = layout.to_positions(rows)
        embeddings = model.rotary_emb(expanded, layout.positions)
        out, _ = layer.self_attn(
            layer.input_layernorm(expanded), position_embeddings=embeddings, attention_mask=additive
        )
        means = []
        for b in range(rows.shape[0]):
            sample = torch.zeros_like(rows[b])
            for r in range(layout.num_rows):
                members = (layout.expand[b] == r) & layout.valid[b]
                if members.any():
                    sample[r] = out[b, members].mean(dim=0)
            means.append(sample)
        rows = rows + torch.stack(means)
        rows = rows + layer.mlp(layer.post_attention_layernorm(rows))
        if index < len(residuals):
            rows = rows + residuals[index]
    return model.norm(rows)


# A tiny random LLaVA (CLIP tower + a TINY language model), for DyMU end to end.
IMAGE_TOKEN = 63
PATCHES = 16  # 32 px images, 8 px patches
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_llava(family: str = "llama") -> LlavaForConditionalGeneration:
    """A random LLaVA: CLIP tower (3 layers, features after 2, CLS dropped) and a tiny ``family`` LLM."""
    config_class, _ = FAMILIES[family]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION).to_dict(),
        text_config=config_class(**TINY).to_dict(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=PATCHES,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).double().eval()


def llava_images(count: int, seed: int = 0) -> torch.Tensor:
    """Alternately smooth (a 2 x 2 colour field blown up: few distinct patches) and noisy images."""
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(count, 3, 2, 2, generator=generator), size=32, mode="bilinear")
    noisy = torch.randn(count, 3, 32, 32, generator=generator)
    return torch.where(torch.arange(count)[:, None, None, None] % 2 == 0, smooth, noisy).double()


def prompt_batch() -> dict[str, torch.Tensor]:
    """Two samples, left-padded: sample 0 has two images (smooth, noisy) between text, sample 1 one
    image (smooth) after padding; 3 images in all, in placeholder order."""
    image = [IMAGE_TOKEN] * PATCHES
    first = [1, 2, *image, 3, *image, 4, 5]
    second = [6, *image, 7, 8]
    pad = len(first) - len(second)
    input_ids = torch.tensor([first, [0] * pad + second])
    attention_mask = torch.tensor([[1] * len(first), [0] * pad + [1] * len(second)])
    pixels = llava_images(3)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def merging_policy(model: LlavaForConditionalGeneration) -> MergePolicy:
    """Thresholds from the test images themselves: about 6 merges per image and layer."""
    backbone = get_backbone("hf_clip")
    found = batch_thresholds(backbone, model.model.vision_tower, llava_images(4), r=6)
    return MergePolicy(thresholds=[t + 1e-6 for t in found])


def greedy_reference(model, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding with no cache at all: every step reruns the naive VTU reference (hidden states
    copied to positions, the stock attention module, per-row means) over the whole sequence.
    ``batch`` may hold ``image_sizes``, ``batch_num_images`` and ``pixel_values_videos`` (LLaVA-NeXT / OneVision)."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {key: batch.get(key) for key in ("image_sizes", "batch_num_images", "pixel_values_videos")}
    inputs = dymu_inputs(model, batch["input_ids"], batch.get("pixel_values"), mask, positions, **extra)
    rows, layout = inputs.rows, inputs.layout
    language = model.model.language_model
    tokens = []
    for _ in range(steps):
        hidden = naive_reference(language, rows, layout)
        last = hidden.gather(1, layout.expand[:, -1:, None].expand(-1, -1, hidden.shape[-1]))
        token = model.lm_head(last).argmax(-1)  # [B, 1]
        tokens.append(token)
        rows = torch.cat([rows, model.get_input_embeddings()(token)], dim=1)
        layout = layout.extend(layout.positions[:, -1:] + 1)
    return torch.cat(tokens, dim=1)


def generate(model, batch: dict[str, torch.Tensor], steps: int, **kwargs):
    return model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)

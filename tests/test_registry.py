"""The backbone registry: names, did-you-mean, duplicates, and third-party entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from dymu_lightning.backbones import Backbone, get_backbone, list_backbones, register_backbone, registry
from dymu_lightning.backbones.timm_vit import TimmViT


@pytest.fixture
def clean_registry(monkeypatch):
    """Let a test add entries without leaking them into the rest of the session."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_builtin_names():
    builtin = {"timm_vit", "hf_clip", "hf_siglip", "hf_dinov2", "dinov2_vits14_offline"}
    builtin |= {"hf_qwen2_vl", "hf_qwen2_5_vl", "hf_qwen3_vl"}
    assert builtin <= set(list_backbones())
    backbone = get_backbone("hf_siglip")
    assert isinstance(backbone, Backbone) and backbone.name == "hf_siglip"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match=r"unknown backbone 'hf_clp'\. Did you mean 'hf_clip'"):
        get_backbone("hf_clp")


def test_decorator_registers_and_duplicates_warn(clean_registry):
    @register_backbone("my_vit")
    class MyViT(TimmViT):
        pass

    assert isinstance(get_backbone("my_vit"), MyViT)
    with pytest.warns(UserWarning, match=r"backbone 'my_vit' is registered twice"):
        register_backbone("my_vit")(TimmViT)
    assert type(get_backbone("my_vit")) is TimmViT


def test_third_party_entry_point(clean_registry, tmp_path, monkeypatch):
    """A package that declares ``[dymu_lightning.backbones]`` in its metadata is found by name."""
    (tmp_path / "thirdparty_vit.py").write_text(
        textwrap.dedent(
            """
            from dymu_lightning.backbones.timm_vit import TimmViT

            class ThirdPartyViT(TimmViT):
                '''A timm ViT under another name.'''
            """
        )
    )
    dist_info = tmp_path / "thirdparty_vit-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-vit\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[dymu_lightning.backbones]\nthird_party_vit = thirdparty_vit:ThirdPartyViT\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "third_party_vit" in list_backbones()
    backbone = get_backbone("third_party_vit")
    assert type(backbone).__name__ == "ThirdPartyViT" and backbone.name == "third_party_vit"
    assert "thirdparty_vit" in sys.modules


def test_factory_must_return_a_backbone(clean_registry):
    register_backbone("broken")(lambda: object())
    with pytest.raises(TypeError, match=r"backbone 'broken' is registered to .* which did not return a Backbone"):
        get_backbone("broken")

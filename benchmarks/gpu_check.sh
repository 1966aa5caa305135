#!/usr/bin/env bash
# The GPU check, in at most 9 minutes (every step is cut at a shared deadline, GPU_CHECK_BUDGET_S=540
# from the start). Results go to $OUT. Order (docs/benchmarks.md, "GPU check"): first the questions of
# /work/shared/gpu-speed.md section 8 (attention kernels at CLIP-L shapes, cuDNN plan-cache hits, the
# encoder's paths at batch 1 and 64 against the padded engine and the token-drop limit, a profile),
# then tests/test_gpu.py, then the standing benchmarks.
#
# 1. Here, once (the GPU machine has no network): wheels of our pins into .whl/ (22 MiB) and the 26
#    bundled photos into .gpu_assets/ (5 MiB); both are git-ignored, so they travel only as `carry`.
#
#      bash benchmarks/fetch_gpu_wheels.sh
#
# 2. The device `run` call, from the repository root (timeout_s leaves a minute over the deadline):
#
#      command: set -o pipefail; PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/log.txt
#      carry:   [".whl", ".gpu_assets"]
#      timeout_s: 600
#
#    $OUT then holds log.txt, gpu_attention.md, cudnn_cache.log, engine_paths.md/.json, gpu_profile.md,
#    compiled_blocks.md/.json, qwen_vl_prefill.md, encoder_speed.md/.json, calibration_speed.md and llava_generate.md.
#
# Dry run here, on the CPU with tiny sizes (installs, imports and paths; no CUDA, the gpu tests skip;
# a few minutes on 2 cores). PYTHON defaults to .venv/bin/python in a dry run, python3 otherwise:
#
#      GPU_CHECK_DRY=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# The machine has Python 3.12, torch 2.11+cu130 and transformers 5.17; the wheels (transformers 5.24.0,
# timm 1.0.31, huggingface-hub 2.4.0, pytest, omegaconf, webdataset, ...) go to a --target folder put
# first on PYTHONPATH. The repository is not pip-installed: its package is assembled in a temporary
# folder (backbones/ and recipes/ become dymu_lightning.backbones and .recipes, as pyproject.toml maps
# them), and pytest runs with `python -P` so that the checkout's own dymu_lightning/ does not shadow it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY:-0}
[[ $DRY == 1 && -x .venv/bin/python ]] && PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PYTHON=${PYTHON:-python3}          # runs everything
PIP_PYTHON=${PIP_PYTHON:-$PYTHON}  # installs the wheels (with pip, else by unzipping them)
OUT=${OUT:?set OUT to the folder the results go to}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DEADLINE=$(($(date +%s) + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
FAILED=()

# step NAME CAP_S COMMAND...: run with a time limit of CAP_S, or less if the deadline is nearer.
step() {
    local name=$1 cap=$2 start rc
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 10)); then
        echo "=== $name: skipped, the ${BUDGET} s budget is spent"
        FAILED+=("$name (not run)")
        return
    fi
    ((cap > left)) && cap=$left
    echo "=== $name (at most ${cap} s): $*"
    start=$(date +%s)
    if declare -F "$1" > /dev/null; then
        "$@"  # a function of this script: quick file operations, not timed out
    else
        timeout --kill-after=10 "$cap" "$@"
    fi
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
    ((rc == 0)) || FAILED+=("$name (exit $rc$( ((rc == 124)) && echo ', timed out'))")
}

install_wheels() {
    if "$PIP_PYTHON" -m pip --version > /dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore "$PIP_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$ROOT"/.whl/*.whl
    else  # no pip: these wheels have no .data folders, so unzipping is installing
        for wheel in "$ROOT"/.whl/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$WORK/site" || return 1; done
    fi
}

assemble_package() {
    mkdir -p "$WORK/src" &&
        cp -r "$ROOT/dymu_lightning" "$WORK/src/" &&
        cp -r "$ROOT/backbones" "$WORK/src/dymu_lightning/backbones" &&
        cp -r "$ROOT/recipes" "$WORK/src/dymu_lightning/recipes"
}

echo "=== gpu_check $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)'), $(date -u +%FT%TZ), dry=$DRY"
ls "$ROOT"/.whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run benchmarks/fetch_gpu_wheels.sh"; exit 2; }
ls "$ROOT"/.gpu_assets/images/skimage/*.png > /dev/null 2>&1 || { echo "no .gpu_assets/: run benchmarks/fetch_gpu_wheels.sh"; exit 2; }
step "install wheels" 120 install_wheels
step "assemble dymu_lightning" 30 assemble_package
export PYTHONPATH=$WORK/site:$WORK/src
export DYMU_CACHE=$ROOT/.gpu_assets  # assets.sample_images() finds the photos there
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

step "versions" 90 "$PYTHON" -P - << 'PY'
import importlib, platform, sys

import torch

print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
pins = {"transformers": "5.24.0", "timm": "1.0.31", "huggingface_hub": "2.4.0", "tokenizers": "0.23.3",
        "omegaconf": "2.4.0", "webdataset": "1.0.2", "pytest": "9.2.0", "lightning": None, "torchmetrics": None,
        "torchvision": None, "numpy": None, "PIL": None, "dymu_lightning": None}
wrong = []
for name, pin in pins.items():
    module = importlib.import_module(name)
    version = getattr(module, "__version__", "?")
    print(f"{name:16} {version:14} {module.__file__}")
    if pin is not None and version != pin:
        wrong.append(f"{name} {version}, expected {pin}")
import dymu_lightning.backbones  # noqa: E402  (the assembled package, with its subpackages)
from dymu_lightning.assets import fetch as assets  # noqa: E402

print("dymu_lightning.backbones", dymu_lightning.backbones.__file__)
print(len(assets.sample_images()), "photos in", assets.cache_dir())
sys.exit("not our pins: " + "; ".join(wrong) if wrong else 0)
PY
command -v nvidia-smi > /dev/null && step "nvidia-smi" 30 nvidia-smi

cudnn_cache() {  # gpu-speed.md 8.2: the padded engine's cuDNN plan-cache hit rate over 20 forwards
    timeout --kill-after=10 "$1" "$PYTHON" benchmarks/gpu_attention.py --cudnn-cache > "$OUT/cudnn_cache.log" 2>&1
    local rc=$?
    echo "cuDNN SDPA cache lines: $(grep -ci hit "$OUT/cudnn_cache.log") mention a hit, $(grep -ci miss "$OUT/cudnn_cache.log") a miss"
    tail -3 "$OUT/cudnn_cache.log"
    return $rc
}

# Section 8 first: the engine's open questions (which attention kernel, where the time goes).
if [[ $DRY != 1 ]]; then
    step "attention kernels (8.1)" 90 "$PYTHON" benchmarks/gpu_attention.py --profile --out "$OUT/gpu_attention"
    step "cuDNN plan cache (8.2)" 5 cudnn_cache 90
    # --compile-merge: both paths again with matching and the merge step through torch.compile (the
    # warm-up call compiles: about a minute on the machine's 16 cores, inside this step's cap).
    # --bias-heads: both paths again with the log-size bias on the padded grid instead of the widened
    # heads folded into the projections (varlen_attn), the default there. Step 8.1 also times the
    # attention sublayer with the heads widened per call against folded into the weights.
    step "engine paths (8.3)" 210 "$PYTHON" benchmarks/encoder_speed.py --device cuda --dtype bfloat16 \
        --geometry l14_336 --batch 1 64 --repeats 3 --budgets 0.33 --paths dynamic static --compare-padded \
        --compile-merge --bias-heads --out "$OUT/engine_paths"
    step "encoder profile (8.4)" 60 "$PYTHON" benchmarks/gpu_profile.py --encoder-only --out "$OUT/gpu_profile"
    # Issue 12: every block through torch.compile (compile_blocks=True) against the same engine eager,
    # on both paths; the warm-up call compiles (three graphs per structure, dynamic shapes, shared by
    # all blocks and both batch sizes). A compile failure costs its rows, not the step.
    step "compiled blocks (8.5)" 150 "$PYTHON" benchmarks/encoder_speed.py --device cuda --dtype bfloat16 \
        --geometry l14_336 --batch 1 64 --repeats 3 --budgets 0.33 --paths dynamic static \
        --compile-blocks --out "$OUT/compiled_blocks"
else
    step "engine paths (8.3)" 300 "$PYTHON" benchmarks/encoder_speed.py --device cpu --dtype float32 \
        --geometry b16_224 --batch 1 2 --repeats 1 --budgets 0.33 --paths dynamic static --compare-padded \
        --compile-merge --bias-heads --out "$OUT/engine_paths"
    step "compiled blocks (8.5)" 300 "$PYTHON" benchmarks/encoder_speed.py --device cpu --dtype float32 \
        --geometry b16_224 --batch 1 --repeats 1 --budgets 0.33 --paths static \
        --compile-blocks --out "$OUT/compiled_blocks"
fi

# -P (here and above): the checkout's dymu_lightning/, without its subpackages, must not come first on
# sys.path. The benchmark scripts are safe: their sys.path[0] is benchmarks/.
step "tests/test_gpu.py" 120 "$PYTHON" -P -m pytest -m gpu -q -rs --durations=5 -p no:cacheprovider tests/test_gpu.py

BENCH=(--device cuda --dtype bfloat16)
if [[ $DRY == 1 ]]; then  # the same scripts and options, tiny: only the plumbing is checked
    BENCH=(--device cpu --dtype float32)
    step "qwen_vl_prefill" 300 "$PYTHON" benchmarks/qwen_vl_prefill.py "${BENCH[@]}" --geometry tiny \
        --batch 1 --repeats 1 --out "$OUT/qwen_vl_prefill"
    step "encoder_speed" 300 "$PYTHON" benchmarks/encoder_speed.py "${BENCH[@]}" --geometry b16_224 \
        --batch 1 2 --repeats 1 --out "$OUT/encoder_speed"
    step "calibration_speed" 120 "$PYTHON" benchmarks/calibration_speed.py "${BENCH[@]}" --geometry b16_224 \
        --batch 4 --r 16 --repeats 1 --out "$OUT/calibration_speed"
    step "llava_generate" 120 "$PYTHON" benchmarks/llava_generate.py --model llava15-7b --tiny "${BENCH[@]}" \
        --batch 1 2 --repeats 1 --new-tokens 2 --out "$OUT/llava_generate"
else
    # issue 15: Qwen2.5-VL-7B's geometry, random weights (16 GiB in bf16, built on the GPU): the tower
    # and the whole prefill against stock at batch 1 and 8, images of 256 and 384 cells.
    step "qwen_vl_prefill" 90 "$PYTHON" benchmarks/qwen_vl_prefill.py "${BENCH[@]}" --geometry qwen2.5-vl-7b \
        --batch 1 8 --repeats 3 --out "$OUT/qwen_vl_prefill"
    step "encoder_speed" 200 "$PYTHON" benchmarks/encoder_speed.py "${BENCH[@]}" --geometry siglip_b16_384 l14_336 \
        --batch 1 64 --repeats 3 --out "$OUT/encoder_speed"
    step "calibration_speed" 90 "$PYTHON" benchmarks/calibration_speed.py "${BENCH[@]}" --geometry l14_336 \
        --batch 64 --r 16 --repeats 5 --out "$OUT/calibration_speed"
    # issue 12's LLaVA targets: prefill at batch 1 and 16, compact decode per token at 64, peak memory.
    # With the real tower's counts instead: --model dinov2s-7b (needs the DINOv2-S weights carried over).
    step "llava_generate" 240 "$PYTHON" benchmarks/llava_generate.py --model llava15-7b "${BENCH[@]}" \
        --batch 1 16 64 --repeats 2 --new-tokens 16 --out "$OUT/llava_generate"
fi

rm -rf "$WORK"
echo "=== files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if ((${#FAILED[@]})); then
    echo "=== FAILED: ${FAILED[*]}"
    exit 1
fi
echo "=== all steps passed"

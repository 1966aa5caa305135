#!/usr/bin/env bash
# The results page's probe studies (Fashion-MNIST at 112 and 224 px, 10,000 / 10,000 images) on a GPU
# machine, in a few minutes instead of hours on 2 CPU cores; the other studies then run on the CPU into
# the same work folder, and the page combines both (docs/evaluation.md, "The results page").
#
# Needs, on the GPU machine: the wheels of our pins (benchmarks/fetch_gpu_wheels.sh; installed into
# $SITE unless $SITE already holds them) and $DYMU_CACHE with dinov2-vits14/ and fashion-mnist/ as
# `make assets` leaves them. Writes $OUT/log.txt and $OUT/results.tgz (the work folder, shards left out).
# Back on the CPU machine:
#
#   tar xzf results.tgz                 # -> runs/results, with its results.json
#   python -m dymu_lightning results --studies photos next_token
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
SITE=${SITE:-/tmp/site}
WORK=runs/results
SRC=$(mktemp -d)
if [[ ! -d $SITE/transformers ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
fi
# The package as pyproject.toml maps it (backbones/ and recipes/ inside dymu_lightning/); python -P keeps
# the checkout's dymu_lightning/ (without them) off sys.path.
cp -r dymu_lightning "$SRC/" && cp -r backbones "$SRC/dymu_lightning/backbones" && cp -r recipes "$SRC/dymu_lightning/recipes" || exit 2
export PYTHONPATH=$SITE:$SRC HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -P -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || echo "=== GPU tests failed (the studies run anyway)"
python3 -P -m dymu_lightning results --studies probe --accelerator cuda --eval-batch 256 --workers 8 \
    --work "$WORK" --page "$SRC/page/results.md"
status=$?
tar czf "$OUT/results.tgz" --exclude="$WORK/shards" "$WORK"
exit $status

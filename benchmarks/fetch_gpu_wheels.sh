#!/usr/bin/env bash
# Prepare, here, what benchmarks/gpu_check.sh needs on the GPU machine (which has no network): the
# wheels it installs, into .whl/, and the bundled photos the benchmarks read, into .gpu_assets/. Both
# are git-ignored and travel to the device as `carry`.
#
#   bash benchmarks/fetch_gpu_wheels.sh          # -> .whl/ (about 22 MiB) and .gpu_assets/ (about 5 MiB)
#
# The GPU machine has Python 3.12, torch 2.11+cu130, transformers 5.17 (with huggingface-hub 1.x and
# their dependencies), timm, lightning 2.6.6, torchmetrics 1.9.0 and scikit-image; no pytest,
# omegaconf or webdataset. We carry our pins of what differs or is missing, plus the new dependencies
# of huggingface-hub 2.x (httpx2 and friends; 1.x used httpx). Everything else (numpy, pillow,
# torchvision, safetensors, regex, typer, hf-xet, filelock, fsspec, tqdm, pyyaml, packaging,
# typing-extensions) is already there, in versions transformers 5.17 needed, which satisfy
# transformers 5.24 too. Only tokenizers is a binary wheel (abi3, manylinux x86_64); the rest are pure.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
mkdir -p "$DEST"

PACKAGES=(
    transformers==5.24.0
    huggingface-hub==2.4.0
    tokenizers==0.23.3
    timm==1.0.31
    omegaconf==2.4.0
    webdataset==1.0.2
    braceexpand==0.1.7
    # huggingface-hub 2.x's HTTP stack (1.x used httpx, which the device has instead)
    httpx2==2.16.2
    httpcore2==2.16.2
    truststore==0.10.5
    h11==0.16.0
    anyio==4.16.0
    idna==3.20
    click==8.5.1
    # the test runner
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    pygments==2.21.0
)

for spec in "${PACKAGES[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    stem=$(echo "$name" | tr '.-' '__' | tr '[:upper:]' '[:lower:]')
    if compgen -G "$DEST/${stem}-${version}-*.whl" > /dev/null; then
        continue
    fi
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$spec"; then
        # sdist only: build a pure-python wheel here
        echo "no wheel for $spec; building one" >&2
        "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$spec"
    fi
done
# A wheel built here must be pure python, or it will not install on the device.
for wheel in "$DEST"/*.whl; do
    case "$wheel" in
        *-none-any.whl | *-abi3-manylinux*x86_64.whl | *-cp312-manylinux*x86_64.whl) ;;
        *) echo "unexpected platform wheel: $wheel" >&2; exit 1 ;;
    esac
done

# Every requirement of a carried wheel is either carried or on the device already (ASSUMED: what
# torch, torchvision, transformers 5.17, huggingface-hub 1.x, timm, lightning and scikit-image bring).
"$PYTHON" - "$DEST" <<'PY'
import sys, zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ASSUMED = {
    "torch", "torchvision", "numpy", "pillow", "pyyaml", "packaging", "tqdm", "regex", "safetensors",
    "typer", "hf-xet", "filelock", "fsspec", "typing-extensions", "lightning", "torchmetrics",
}
environment = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
carried = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(zf.read(metadata).decode())
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name not in carried and name not in ASSUMED:
            missing.append(f"{wheel.name}: {line}")
if missing:
    sys.exit("requirements neither carried nor on the device:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels; every requirement carried or on the device")
PY

# The photos: assets.sample_images() reads $DYMU_CACHE/images/skimage, where gpu_check.sh points it.
"$PYTHON" - << 'PY'
import shutil
from pathlib import Path

from dymu_lightning.assets import fetch as assets

target = Path(".gpu_assets/images/skimage")
target.mkdir(parents=True, exist_ok=True)
photos = assets.sample_images()
for path in photos.values():
    shutil.copy2(path, target / path.name)
print(f"{len(photos)} photos in {target}")
PY
du -sh .whl .gpu_assets

#!/usr/bin/env bash
# The prepared GPU check (issue 21 §2), for a lent H100/H200-class GPU through the device tool; under 6 minutes.
# The device image has Python 3.12 with a CUDA torch but not our pins: our pure-Python dependencies travel as
# wheels in .whl/ (git-ignored; `bash bench/gpu_wheels.sh` fetches them here, ~50 MB), installed into /tmp/site,
# and the machine's own torch is used. Run it as the device tool's command with `carry: [".whl"]`:
#     bash bench/gpu_check.sh
# It writes into $OUT (the device tool's folder that comes back), else bench/results/:
#     gpu_tests.log   the CUDA tests (tests/test_gptq.py: RTN/GPTQ/AWQ on cuda vs cpu, evaluation on cuda vs cpu)
#     gpu_check.md/.json, gpu_check.log   GPTQ, AWQ and RTN of a random-init ~1 B Llama built and evaluated on the GPU
# Locally, `bash bench/gpu_check.sh --dry` runs the same steps on the CPU with a tiny model (checks the script).
set -uo pipefail
DEST=${OUT:-bench/results}
PY=python3
if [ "${1:-}" = "--dry" ]; then
    PY=${PYTHON:-.venv/bin/python}
    DRY=--dry
    DEST=${OUT:-/tmp/gpu-check-dry}  # a dry run's figures are not the GPU's: never into bench/results
else
    DRY=
    ls .whl/*.whl > /dev/null || { echo "no .whl/: run bash bench/gpu_wheels.sh here and carry .whl"; exit 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" \
    | tee "$DEST/gpu_tests.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$DEST/gpu_tests.log"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_gptq.py \
    -k "cuda or each_device or recipe_device" 2>&1 | tail -25 | tee -a "$DEST/gpu_tests.log"
timeout 330 $PY bench/gpu_check.py --out "$DEST" $DRY 2>&1 | tail -40 | tee "$DEST/gpu_check.log"

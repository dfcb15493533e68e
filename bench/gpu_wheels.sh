#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh installs on the device machine (Python 3.12, x86-64): our pinned
# pure-Python dependencies its image lacks or holds in other versions (constraints.txt), and gensim for the bundled
# text. Into .whl/ (add `/.whl/` to .git/info/exclude); about 50 MB, under the device tool's 64 MiB.
set -euo pipefail
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin compressed-tensors)" "$(pin gguf)" "$(pin transformers)" "$(pin huggingface_hub)" "$(pin httpx2)" \
    "$(pin httpcore2)" "$(pin tokenizers)" "$(pin loguru)" "$(pin click)" "$(pin typing_extensions)" \
    "$(pin gensim)" "$(pin smart_open)" "$(pin truststore)"
du -sh .whl

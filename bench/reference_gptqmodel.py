"""Reference GPTQ: GPTQModel's own quantizer (`GPTQModel.load(base, QuantizeConfig)` → `quantize` → `save`), on
CPU. Runs in a SEPARATE environment (never a dependency of quantize); the environment is the one
bench/classic_loaders.py documents (/tmp/gpmenv: GPTQModel 7.7.0 with --no-deps on torch 2.13.0):

    GPTQMODEL_CPU_WORKERS=2 /tmp/gpmenv/bin/python bench/reference_gptqmodel.py BASE_DIR CALIB.pt OUT_DIR --group-size 64

CALIB.pt holds the calibration token ids [samples, seq_len] written by bench/reference.py, so every tool sees the
same tokens. The scheme is plain GPTQ as ours and llm-compressor's run it: no act-order and none of GPTQModel's
own variants (act_group_aware, its default for GPTQ, is switched off), damp 0.01, true sequential (its default),
fp32 weights, lm_head kept. offload_to_disk (its default) is switched off: the model fits in memory, and writing
finished modules to disk would only slow it. Writes OUT_DIR (classic gptq layout) and OUT_DIR/bench.json.
"""

import json
import os
import time
from pathlib import Path

import torch

from reference_common import parser, peak_rss


def main() -> None:
    ap = parser()
    args = ap.parse_args()

    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(args.calib)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    settings = dict(bits=4, group_size=args.group_size, sym=not args.asym, desc_act=False, act_group_aware=False,
                    damp_percent=0.01, true_sequential=True, offload_to_disk=False)
    start = time.perf_counter()
    model = GPTQModel.load(args.base, QuantizeConfig(**settings), device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=1)
    seconds = time.perf_counter() - start
    model.save(args.out)
    (Path(args.out) / "bench.json").write_text(json.dumps({
        "tool": f"GPTQModel {gptqmodel.__version__}", "seconds": seconds, "peak_rss_bytes": peak_rss(),
        "threads": torch.get_num_threads(), "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "settings": settings, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}, indent=2))


if __name__ == "__main__":
    main()

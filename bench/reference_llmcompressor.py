"""Reference GPTQ / AWQ: llm-compressor's GPTQModifier, or AWQModifier + QuantizationModifier, through
`oneshot`, on CPU. Runs in a SEPARATE environment
(never a dependency of quantize):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 \
        && /tmp/refenv/bin/pip install -c <(echo torch==2.13.0) llmcompressor==0.14.0.1
    /tmp/refenv/bin/python bench/reference_llmcompressor.py BASE_DIR CALIB.pt OUT_DIR --method awq --group-size 64

CALIB.pt holds the calibration token ids [samples, seq_len] written by bench/reference.py, so both
implementations see the same tokens. Writes OUT_DIR (compressed-tensors) and OUT_DIR/bench.json (seconds,
peak RSS).
"""

import json
import time
from pathlib import Path

import torch

from reference_common import parser, peak_rss


def main() -> None:
    ap = parser()
    ap.add_argument("--method", choices=["gptq", "awq", "w8a8"], default="gptq")
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": not args.asym, "strategy": "group",
               "group_size": args.group_size}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if args.method == "w8a8":  # llm-compressor's W8A8 example: SmoothQuant, then GPTQ with the W8A8 preset
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        weights = "W8A8 preset (int8 per channel, dynamic per-token int8 inputs)"
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], dampening_frac=0.01,
                               block_size=128)]
    elif args.method == "gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                              actorder=None)
    else:  # AWQ only smooths; the quantization modifier after it rounds onto the grid
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # PATCH (CPU only): AWQModifier 0.14 pins its cached activations for faster host-to-GPU copies, and
        # pin_memory() raises without an accelerator. Pinning changes no value: make it a no-op.
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    import llmcompressor

    (Path(args.out) / "bench.json").write_text(json.dumps({
        "tool": f"llmcompressor {llmcompressor.__version__} "
                + {"gptq": "GPTQModifier", "awq": "AWQModifier + QuantizationModifier",
                   "w8a8": "SmoothQuantModifier(0.8) + GPTQModifier(W8A8)"}[args.method], "seconds": seconds,
        "peak_rss_bytes": peak_rss(), "threads": torch.get_num_threads(), "weights": weights,
        "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "patched": "IntermediatesCache.pin_memory is a no-op (CPU)" if args.method == "awq" else None}, indent=2))


if __name__ == "__main__":
    main()

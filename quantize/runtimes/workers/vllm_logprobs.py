"""Worker run with the vLLM engine's own interpreter (runtimes/engines.py), never imported by quantize: vLLM's
full-vocabulary prompt log-probabilities of given token ids.

    python vllm_logprobs.py REQUEST.json

REQUEST: {"model": folder, "ids": .npy of int64 [chunks, n], "out": folder, "dtype": "bfloat16" | "float32" | ...,
"max_model_len": int, "targets_only": bool (optional)}. Writes out/chunk_{i}.npy, float32 [n - 1, vocab]: row t is
vLLM's log-probability distribution of the token at position t + 1 given the tokens before it (prompt_logprobs), and
out/info.json (vLLM's version, the dtype). With targets_only, chunk_{i}.npy is [n - 1]: the log-probability of the
token that does come next (perplexity only; vLLM turns a full distribution into one Python object per token, minutes
per chunk for a 262k vocabulary). One LLM instance scores every chunk, greedy, prefix caching off.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main(request_file: str) -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(Path(request_file).read_text())
    ids = np.load(request["ids"])
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=request["model"], dtype=request["dtype"], max_model_len=int(request["max_model_len"]),
              enforce_eager=True, max_logprobs=-1, enable_prefix_caching=False, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    targets_only = bool(request.get("targets_only"))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0 if targets_only else -1)
    for i, row in enumerate(ids):
        result = llm.generate([{"prompt_token_ids": [int(t) for t in row]}], params, use_tqdm=False)[0]
        if targets_only:  # each position's dict holds the prompt's own next token (and the top one, if other)
            np.save(out / f"chunk_{i}.npy", np.array([position[int(row[t + 1])].logprob for t, position
                                                      in enumerate(result.prompt_logprobs[1:])], dtype=np.float32))
            continue
        logp = np.full((len(row) - 1, vocab), -np.inf, dtype=np.float32)
        for t, position in enumerate(result.prompt_logprobs[1:]):
            tokens = np.fromiter(position.keys(), dtype=np.int64, count=len(position))
            logp[t, tokens] = np.fromiter((p.logprob for p in position.values()), dtype=np.float32,
                                          count=len(position))
        np.save(out / f"chunk_{i}.npy", logp)
    import vllm

    (out / "info.json").write_text(json.dumps({"vllm": vllm.__version__, "dtype": request["dtype"],
                                               "vocab": int(vocab), "chunks": int(len(ids))}))


if __name__ == "__main__":
    main(sys.argv[1])

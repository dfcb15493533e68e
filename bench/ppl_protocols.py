"""Our perplexity protocol (llama.cpp's: non-overlapping n_ctx chunks, second half scored) against
lm-eval's rolling log-likelihood (wikitext-style: each document scored whole, in windows of the model's
max_length) on the same text and model: bits per byte side by side, with the difference explained by context.

Text: the first N held-out bundled articles (the wiki_rolling task's documents). Model: SmolLM2-135M fp32.
Usage: python bench/ppl_protocols.py [--articles 5] [--max-length 2048]. Writes bench/results/ppl_protocols.{json,md}.
"""

import argparse
import json
import math
from pathlib import Path

from quantize.measure import lmeval
from quantize.measure import quality
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.sources.texts import Text

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--articles", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=2048, help="lm-eval window (SmolLM2's own 8192 took >10 min)")
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    tok = load_tokenizer(base.path)
    model = load_model(base.path, "float32")
    folder = lmeval.data_dir()
    lmeval.write_data(folder)
    docs = [json.loads(line) for line in (folder / "wiki_eval_articles.jsonl").read_text().splitlines()][: args.articles]
    text = Text(f"bundled:wiki/eval first {args.articles} articles", "\n\n".join(d["text"] for d in docs))
    rows = {}
    for n_ctx in (512, 2048):
        chunks = quality.make_chunks(tok, text, n_ctx, None)
        s = quality.score_model(model, chunks, None, f"ours n_ctx {n_ctx}")
        rows[f"quantize (llama.cpp protocol), n_ctx {n_ctx}"] = {
            "ppl": s["ppl"], "bits_per_byte": s["bits_per_byte"], "tokens_scored": s["tokens_scored"],
            "context_per_scored_token": f"{n_ctx // 2}–{n_ctx - 1}", "text_tokens": chunks.text_tokens}
    lm = lmeval.run(model, tok, ["wiki_rolling"], limit=args.articles, max_length=args.max_length)
    r = lm["results"]["quantize_wiki_rolling"]
    rows[f"lm-eval {lm['protocol']['lm_eval']} rolling loglikelihood"] = {
        "word_perplexity": r["word_perplexity"], "byte_perplexity": r["byte_perplexity"],
        "bits_per_byte": r["bits_per_byte"], "context_per_scored_token": f"0–{lm['protocol']['max_length'] - 1} "
        "(each document from its start, windows of max_length)"}
    result = {"model": "bundled:smollm2-135m fp32", "text": text.describe(), "rows": rows,
              "check": {"byte_perplexity_equals_2^bpb": math.isclose(2 ** r["bits_per_byte"], r["byte_perplexity"],
                                                                     rel_tol=1e-6)}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ppl_protocols.json").write_text(json.dumps(result, indent=2))
    lines = [f"Perplexity protocols on the same text ({text.name}, {text.describe()['chars']} chars) and model "
             "(SmolLM2-135M fp32)", "", "| protocol | bits per byte | other | context each scored token sees |",
             "|---|---|---|---|"]
    for name, v in rows.items():
        other = (f"token PPL {v['ppl']:.4f} over {v['tokens_scored']} tokens" if "ppl" in v else
                 f"word PPL {v['word_perplexity']:.3f}, byte PPL {v['byte_perplexity']:.4f}")
        lines.append(f"| {name} | {v['bits_per_byte']:.4f} | {other} | {v['context_per_scored_token']} |")
    (HERE / "results" / "ppl_protocols.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

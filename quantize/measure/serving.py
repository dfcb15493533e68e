"""The serve check: does the artefact answer over an OpenAI-compatible API, and what does serving cost?

For one artefact: start its engine's own server on a free loopback port (runtimes/serve.py), wait until it is
healthy (bounded), then with the official `openai` client
    1. one chat completion: the answer must be non-empty;
    2. one streamed chat completion: time to first token (TTFT: request sent → first content chunk) and decode
       tokens/sec over the API ((tokens − 1) / (last chunk − first chunk));
    3. `requests` chat completions, `concurrency` at a time: aggregate completion tokens/sec over the wall time;
and stop the server, whatever happened. Every request has a timeout, so a dead server fails the check instead of
hanging the run. Greedy decoding (temperature 0) and a fixed prompt.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quantize.common.errors import QuantizeError
from quantize.runtimes import litert, mlx, serve
from quantize.runtimes.load import detect

PROMPT = "Write three sentences about the history of printing."


def _client(server: serve.Server, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=timeout)


def _chat(client, model: str, max_tokens: int) -> tuple[str, int]:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=max_tokens, temperature=0)
    text = reply.choices[0].message.content or ""
    tokens = reply.usage.completion_tokens if reply.usage else None
    return text, tokens


def _streamed(client, model: str, max_tokens: int) -> dict:
    """TTFT and decode rate of one streamed completion. A chunk whose delta carries content (even an empty string:
    llama.cpp's server sends one per token and holds back incomplete UTF-8) is a token; the server's usage report
    replaces the count when it sends one (stream_options include_usage)."""
    start = time.perf_counter()
    stamps, usage, text = [], None, []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content is not None:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    tokens, counted = (usage, "usage") if usage else (len(stamps), "content chunks")
    out = {"ttft_s": stamps[0] - start if stamps else None, "tokens": tokens, "tokens_from": counted,
           "text": "".join(text)}
    if len(stamps) >= 2 and tokens and tokens > 1:
        out["decode_tokens_per_s"] = (tokens - 1) / (stamps[-1] - stamps[0])
    return out


def litert_check(path: Path, settings) -> dict:
    """A LiteRT file has no OpenAI-compatible server: its .litertlm bundle answers the same prompt greedily on
    LiteRT-LM's CPU engine instead (status `generated`, or `empty` / `failed`), so the run still shows that the
    file loads and talks."""
    engine = "LiteRT-LM (no OpenAI server)"
    if not (path / "model.litertlm").is_file():
        return {"status": "skipped", "engine": engine, "reason": "no model.litertlm bundle beside model.tflite"}
    try:
        got = litert.generate(path, PROMPT, settings.max_tokens)
    except QuantizeError as exc:
        return {"status": "failed", "engine": engine, "reason": str(exc)}
    answer = " ".join(got["answer"].split())
    status = "generated" if answer else "empty"
    return {"status": status, "engine": engine, "prompt": PROMPT, "max_tokens": settings.max_tokens, **got,
            "reason": f"greedy answer in {got['answer_s']:.1f} s (bundle loaded in {got['load_s']:.1f} s): "
                      f"\"{answer[:160]}\"" if answer else "LiteRT-LM returned no text"}


def check(path: Path, settings, threads: int | None = None, dtype: str | None = None) -> dict:
    """The serve check of one artefact (`settings`: the recipe's eval.serve). Returns what was measured, or
    {"status": "refused" | "failed", "reason": …}; never raises for what the engine does."""
    engine = None
    try:
        from openai import APIError
    except ImportError:
        return {"status": "refused", "engine": None, "reason": "the serve check talks to the server with the official "
                "`openai` client, which is not installed: pip install 'quantize[serve]' (or set eval.serve.enabled: false)"}
    if detect(path) == "litert":
        return litert_check(path, settings)
    try:
        engine = serve.default_engine(path)
        serve.check_engine(path, engine)
    except QuantizeError as exc:  # an engine that cannot serve this format here, said before starting anything
        return {"status": "refused", "engine": engine, "reason": str(exc)}
    if engine == "mlx" and mlx.on_cpu() and (stored := mlx.stored_dtype(path)) != "float32":
        return {"status": "skipped", "engine": engine,
                "reason": f"mlx-lm's server computes in the folder's {stored}, which MLX's CPU "
                          "backend runs too slowly to measure (runtimes/mlx.py); it runs where MLX has Metal"}
    try:
        # the evaluation's dtype for transformers; vLLM serves in its bfloat16 (serve.VLLM_DTYPE)
        server = serve.start(path, engine, host="127.0.0.1", ctx=settings.ctx, threads=threads,
                             timeout=settings.timeout, dtype=dtype if engine == "transformers" else None)
    except QuantizeError as exc:  # the server exited, failed to load the model or stayed silent
        return {"status": "failed", "engine": engine, "reason": str(exc)}
    out = {"engine": server.engine, "command": " ".join(server.command), "prompt": PROMPT,
           "max_tokens": settings.max_tokens, "temperature": 0}
    try:
        started = time.perf_counter()
        client = _client(server, settings.timeout)
        text, _ = _chat(client, server.model, settings.max_tokens)
        out["first_answer_s"] = time.perf_counter() - started
        out["answer"] = text
        if not text.strip():
            return {**out, "status": "empty", "reason": "the chat completion returned no text"}
        streams = [_streamed(client, server.model, settings.max_tokens) for _ in range(settings.repetitions)]
        if not any(st["text"].strip() for st in streams):
            return {**out, "status": "empty", "reason": "the streamed chat completions returned no text"}
        rates = [st["decode_tokens_per_s"] for st in streams if "decode_tokens_per_s" in st]
        out["stream"] = {"repetitions": len(streams), "tokens_from": streams[0]["tokens_from"],
                         "ttft_s": statistics.median(st["ttft_s"] for st in streams if st["ttft_s"] is not None),
                         "decode_tokens_per_s": statistics.median(rates) if rates else None,
                         "tokens": [st["tokens"] for st in streams]}
        start = time.perf_counter()
        with ThreadPoolExecutor(settings.concurrency) as pool:
            replies = list(pool.map(lambda _: _chat(client, server.model, settings.max_tokens),
                                    range(settings.requests)))
        wall = time.perf_counter() - start
        tokens = [t for _, t in replies]
        out["concurrent"] = {"requests": settings.requests, "concurrency": settings.concurrency, "wall_s": wall,
                             "completion_tokens": sum(t or 0 for t in tokens),
                             "tokens_per_s": sum(t or 0 for t in tokens) / wall if all(tokens) else None,
                             "empty_answers": sum(1 for text, _ in replies if not text.strip())}
        out["status"] = "ok"
    except APIError as exc:  # the client's errors (timeouts, connection resets, HTTP errors): the check failed
        out.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    except (IndexError, AttributeError, TypeError) as exc:  # a reply without the fields the API promises
        out.update(status="failed", reason=f"malformed reply ({type(exc).__name__}: {exc})")
    finally:
        serve.stop(server)
    if out.get("status") == "ok":  # a failed check names its log in the reason; a passed one leaves none behind
        server.log.unlink(missing_ok=True)
    return out

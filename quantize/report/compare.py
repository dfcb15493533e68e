"""`quantize compare`: every artefact of one or more runs in one table, and quality against size with the
Pareto front marked (PNG, and a self-contained HTML page with the PNG inlined). Markdown for CI logs.

Inputs are run folders (outputs/<recipe>, holding results.json). KLD and perplexity are only comparable
within one base model and one evaluation protocol; rows carry a short protocol id so mixed inputs show.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path

from quantize.common.errors import QuantizeError
from quantize.fit.gpus import GiB
from quantize.fit.vram import gib
from quantize.report.markdown import base_label


@dataclass
class Row:
    run: str
    name: str
    method: str
    fmt: str
    size: int
    bpw: float | None
    ppl: float
    d_ppl: float | None
    kld: float | None
    same_top: float | None
    pp: float | None
    tg: float | None
    fits: dict[str, int]  # GPU → largest context that fits
    protocol: str
    serve: str = "–"  # the serve check: API decode t/s and TTFT, or its status when it did not pass
    pareto: bool = False
    noise_floor: float | None = None  # the run's KLD noise floor (base vs base with bf16-rounded logits)


def _protocol_id(results: dict) -> str:
    """Same base model (its spec and its measured perplexity) and same evaluation: comparable KLDs."""
    p = results["protocol"]["perplexity"]
    key = json.dumps({**{k: p.get(k) for k in ("text", "n_ctx", "chunks", "tokens_scored", "tokenizer_sha256")},
                      "base": results["base"].get("spec"), "base_ppl": results["base"]["perplexity"]["ppl"]},
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def best_speed(entry: dict, phase: str) -> float | None:
    """The best median tokens/sec of a results entry over its thread counts (phase pp or tg); None unmeasured."""
    rows = (entry.get("speed") or {}).get("rows") or []
    return max(r[phase]["median"] for r in rows) if rows else None


def serve_cell(entry: dict) -> str:
    """'API decode t/s / TTFT ms' of a results entry's serve check, its status if it did not pass, – if unchecked."""
    s = entry.get("serve")
    if not s:
        return "–"
    if s["status"] != "ok":
        return s["status"]
    rate = s["stream"]["decode_tokens_per_s"]
    return f"{rate:.1f} / {1000 * s['stream']['ttft_s']:.0f} ms" if rate else f"ok / {1000 * s['stream']['ttft_s']:.0f} ms"


def load_rows(folders: list[Path]) -> list[Row]:
    rows = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise QuantizeError(f"{folder}: no results.json (give run folders such as outputs/<recipe>)")
        rows += run_rows(folder, json.loads(path.read_text()))
    mark_pareto(rows)
    return rows


def run_rows(folder: Path, results: dict) -> list[Row]:
    """The base and every variant of one run (its results.json) as rows, bits per weight from the manifests."""
    proto = _protocol_id(results)
    base = results["base"]
    base_ppl = base["perplexity"]["ppl"]
    entries = [("base", base, "base", base_label(base), None)]
    for name, v in results["variants"].items():
        manifest = folder / name / "manifest.json"
        bpw = json.loads(manifest.read_text())["result"].get("bits_per_weight") if manifest.is_file() else None
        entries.append((name, v, v["method"]["name"], v["format"], bpw))
    rows = []
    for name, e, method, fmt, bpw in entries:
        k = e["perplexity"].get("kld")
        rows.append(Row(run=folder.name, name=name, method=method, fmt=fmt,
                        size=sum(e["fit"]["weight_bytes_by_dtype"].values()), bpw=bpw, ppl=e["perplexity"]["ppl"],
                        d_ppl=None if name == "base" else e["perplexity"]["ppl"] - base_ppl,
                        kld=None if k is None else k["mean"], same_top=None if k is None else k["same_top"],
                        pp=best_speed(e, "pp"), tg=best_speed(e, "tg"), fits=e["fit"]["largest_context"], protocol=proto,
                        serve=serve_cell(e),
                        noise_floor=(base["perplexity"].get("noise_floor") or {}).get("kld_mean")))
    return rows


def mark_pareto(rows: list[Row]) -> None:
    """On the front: no other row of the same protocol is at most as large and at most as far (KLD), one strictly.
    The base counts with KLD 0 (it is the reference)."""
    kld = lambda r: 0.0 if r.name == "base" else r.kld  # noqa: E731
    for r in rows:
        if kld(r) is None:
            continue
        r.pareto = not any(o is not r and o.protocol == r.protocol and kld(o) is not None and o.size <= r.size
                           and kld(o) <= kld(r) and (o.size < r.size or kld(o) < kld(r)) for o in rows)


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


HEADER = ["run", "artefact", "method", "format", "size", "bpw", "PPL", "Δ PPL", "KLD", "same top %", "pp t/s",
          "tg t/s", "API t/s / TTFT"]


def _cells(r: Row, gpus: list[str]) -> list[str]:
    return [r.run, r.name, r.method, r.fmt, gib(r.size), _fmt(r.bpw, ".2f"), f"{r.ppl:.4f}", _fmt(r.d_ppl, "+.4f"),
            _fmt(r.kld, ".5f"), _fmt(None if r.same_top is None else 100 * r.same_top, ".2f"), _fmt(r.pp, ".1f"),
            _fmt(r.tg, ".1f"), r.serve, *[str(r.fits.get(g, "–")) for g in gpus], "★" if r.pareto else "", r.protocol]


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    gpus = list(rows[0].fits) if rows else []
    head = HEADER + [f"{g}: max ctx" for g in gpus] + ["Pareto", "protocol"]
    return head, [_cells(r, gpus) for r in sorted(rows, key=lambda r: (r.protocol, r.size))]


def markdown(rows: list[Row]) -> str:
    head, body = _table(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], png, gpus: dict[str, int] | None = None) -> None:
    """KLD (log) against size; the Pareto front joined; GPU memory as vertical lines when in range. `png`: a path
    or a binary file object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.kld is not None and r.kld > 0]
    if not pts:
        raise QuantizeError("nothing to chart: no artefact has a KLD against its base (evaluate with kld: true)")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = sorted({r.method for r in pts})  # one marker per method family (e.g. gguf's mixes, auto's mixes)
    marker = dict(zip(methods, "o^sDvP*X"))
    for method in methods:
        ax.scatter([], [], marker=marker[method], color="grey", label=method)
    for r in pts:
        ax.scatter(r.size / GiB, r.kld, color="tab:red" if r.pareto else "tab:blue", marker=marker[r.method], zorder=3)
        ax.annotate(r.name, (r.size / GiB, r.kld), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in pts if r.pareto), key=lambda r: r.size)
    ax.plot([r.size / GiB for r in front], [r.kld for r in front], color="tab:red", lw=1, label="Pareto front")
    floors = sorted({r.noise_floor for r in rows if r.noise_floor})
    ax.set_yscale("log")
    low, high = min(r.kld for r in pts), max(r.kld for r in pts)
    ax.set_ylim(min([low, *floors]) / 2, high * 2)  # no point (nor the noise floor) on an edge
    largest = max(r.size for r in rows) / GiB
    ax.set_xlim(0, 1.1 * largest)  # from zero, so sizes read as a share of the largest (the base, when present)
    for floor in floors:
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.text(0, floor, " noise floor (bf16 logits)", va="bottom", fontsize=7, color="grey")
    for r in rows:  # the base (no KLD against itself) as a reference size
        if r.name == "base":
            ax.axvline(r.size / GiB, color="black", ls="-.", lw=0.8)
            ax.text(r.size / GiB, high * 1.8, f" base {r.size / GiB:.2f} GiB", rotation=90, va="top", fontsize=7)
    for name, usable in (gpus or {}).items():
        if usable / GiB <= 1.1 * largest:
            ax.axvline(usable / GiB, color="grey", ls="--", lw=0.8)
            ax.text(usable / GiB, high * 1.8, f" {name}", rotation=90, va="top", fontsize=7, color="grey")
    ax.set_xlabel("size of weights (GiB)")
    ax.set_ylabel("KLD to base (nats, mean, log scale)")
    ax.set_title("quality against footprint")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)  # beside the plot, never over a point
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)


def html_page(rows: list[Row], png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    head, body = _table(rows)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>quantize compare</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(-n+4){text-align:left}"
            "</style></head><body><h1>quantize compare</h1>"
            f"<img alt='KLD against size' src='data:image/png;base64,{image}'>"
            f"<table><tr>{header}</tr>{''.join(lines)}</table>"
            "<p>KLD: mean KL(base ‖ artefact) per token in nats on the run's held-out text; comparable only "
            "between rows with the same protocol id (same base model and evaluation). ★: on the size/KLD Pareto "
            "front. Max ctx: largest context that fits (estimate; see each run's fit.json).</p></body></html>")

"""report.html: the run's report as one self-contained page a person opens in a browser: the same text and tables
as report.md (rendered from it, so the two never disagree), plus two charts as inline PNG images: KLD against
size with the Pareto front, and the largest context that fits on each GPU for each artefact. No scripts, no
stylesheets or fonts from elsewhere: the page makes no request."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from quantize.report import compare

CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}table{border-collapse:collapse;"
       "font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
       "td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 3px}img{max-width:100%}"
       "p{line-height:1.4}")


def _inline(text: str) -> str:
    """Escaped text with markdown's `code` and **bold**."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_to_html(markdown: str) -> str:
    """The subset report.md uses: # headings, | tables |, paragraphs."""
    out, table = [], []

    def flush_table():
        if table:
            head, *body = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                           if not re.fullmatch(r"\|[-|: ]+\|", line.strip())]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush_table()
    return "\n".join(out)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def fit_chart(rows: list[compare.Row]) -> str:
    """Largest context that fits, per GPU (groups) and artefact (bars), log scale; base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = list(rows[0].fits)
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.35 * len(gpus) * len(rows)), dpi=110)
    height = 0.8 / len(rows)
    for k, r in enumerate(rows):
        ys = [g + k * height for g in range(len(gpus))]
        ax.barh(ys, [max(r.fits[g], 1) for g in gpus], height=height, label=r.name)
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(gpus))], gpus)
    ax.set_xscale("log")
    ax.set_xlabel("largest context that fits (tokens, batch and KV dtype of the recipe; 1 = does not fit)")
    ax.set_title("where each artefact fits")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def render(name: str, results: dict, markdown: str, folder: Path) -> str:
    rows = compare.run_rows(folder, results)
    compare.mark_pareto(rows)
    charts = []
    if any(r.kld for r in rows):
        buffer = io.BytesIO()
        compare.chart(rows, buffer)
        charts.append(("KLD against size; red: the Pareto front (nothing smaller is closer to the base)",
                       base64.b64encode(buffer.getvalue()).decode()))
    cap = results["base"]["fit"]["protocol"]["largest_context_cap"]
    if all(n >= cap for r in rows for n in r.fits.values()):  # identical bars would say nothing
        note = (f"<p>Every artefact fits on every GPU of the recipe ({', '.join(rows[0].fits)}) at the model's whole "
                f"context ({cap} tokens), at the recipe's batch and KV cache type.</p>")
    else:
        note = ""
        charts.append(("Largest context per GPU", fit_chart(rows)))
    figures = "".join(f"<figure><img alt='{html.escape(title, quote=True)}' src='data:image/png;base64,{png}'>"
                      f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, png in charts)
    body = markdown_to_html(markdown)
    body = body.replace("<h2>Quality and speed</h2>", figures + note + "<h2>Quality and speed</h2>", 1)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(name)} · quantize"
            f"</title><style>{CSS}</style></head><body>{body}</body></html>")

"""`quantize` command line: run, plan, recipes. User errors print one message and exit 2, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from quantize.errors import QuantizeError
from quantize.fit import gib
from quantize.recipe import bundled_recipes, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize LLMs from a YAML recipe; measure quality, speed and VRAM fit.")


def _fail(exc: QuantizeError, recipe: Path | None = None) -> None:
    message = str(exc)
    if recipe is not None and not message.startswith(str(recipe)):
        message = f"{recipe}: {message}"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        force: bool = typer.Option(False, "--force", help="replace a finished output folder")) -> None:
    """Build every variant of RECIPE, evaluate it against the base model, write the fit and the report."""
    from quantize import pipeline

    try:
        out = pipeline.run(load_recipe(recipe), force=force)
    except QuantizeError as exc:
        _fail(exc, recipe)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written to the output folder", err=True)
        raise typer.Exit(130)
    typer.echo(str(out / "report.md"))


@app.command()
def plan(recipe: Path = typer.Argument(..., help="recipe YAML"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Validate RECIPE and print what will run, expected sizes and the fit, without loading weights."""
    from quantize import pipeline

    try:
        p = pipeline.plan(load_recipe(recipe))
    except QuantizeError as exc:
        _fail(exc, recipe)
    if as_json:
        typer.echo(json.dumps(p, indent=2))
        return
    typer.echo(f"recipe {p['recipe']} → {p['output']}")
    note = f" in {p['base']['bytes_are']}" if "bytes_are" in p["base"] else ""
    typer.echo(f"base  {p['base']['spec']} ({p['base']['origin']}): {gib(p['base']['bytes'])} of tensors{note}")
    ev = p["eval"]
    typer.echo(f"eval  perplexity n_ctx {ev['perplexity']['n_ctx']}, ≤{ev['perplexity']['max_chunks']} chunks of "
               f"{ev['perplexity']['source']}; KLD {'on' if ev['kld'] else 'off'}; speed pp{ev['speed']['prompt_tokens']} "
               f"tg{ev['speed']['gen_tokens']} × {ev['speed']['repetitions']} at threads {ev['speed']['threads']}")
    for name, v in p["variants"].items():
        typer.echo(f"variant {name}: expected {gib(v['expected_bytes'])}")
        for gpu, ctx in v["fit"]["largest_context"].items():
            rows = [r for r in v["fit"]["rows"] if r["gpu"] == gpu]
            cells = ", ".join(f"{r['context']}: {'fits' if r['fits'] else 'NO'} ({gib(r['headroom_bytes'])} headroom)"
                              for r in rows)
            typer.echo(f"  {gpu:16s} {cells}; largest context {ctx}")


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    for path in bundled_recipes():
        try:
            r = load_recipe(path)
            typer.echo(f"{path}  model {r.model}; " + ", ".join(m.default_variant() for m in r.methods))
        except QuantizeError as exc:
            typer.echo(f"{path}  INVALID: {exc}")


def main() -> None:
    try:
        app()
    except QuantizeError as exc:  # a user error raised outside a command body
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The `exporter` command line: parses arguments and calls one stage function; nothing else lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from exporter import __version__
from exporter.errors import UserError

app = typer.Typer(
    name="exporter",
    help="LoRA fine-tuning to a running, verified Ollama model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"exporter {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """LoRA fine-tuning to a running, verified Ollama model."""
    _state["debug"] = debug


# ---- stage commands are registered below, one block each ----


@app.command("gguf")
def _gguf(
    model: str = typer.Argument(..., help="HF model dir (or hub id); with --adapter: the base model."),
    type_: str = typer.Option(
        "f16", "--type", "-t", help="Comma-separated GGUF types: f32,f16,bf16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output dir (default: <model>-gguf next to the model)."),
    ollama_name: str | None = typer.Option(None, "--ollama-name", help="Model name in the ollama create commands."),
    template: str | None = typer.Option(None, "--template", help="Chat template family (default: detect)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir: write a GGUF LoRA instead."),
    base_gguf: str | None = typer.Option(
        None, "--base-gguf", help="With --adapter: FROM of the Modelfile (GGUF path or Ollama model name)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output dir."),
) -> None:
    """Convert a model to GGUF files (several types in one pass) with one Ollama Modelfile each."""
    from exporter import gguf

    gguf.run(model, type_, out, ollama_name, template, force, adapter, base_gguf)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

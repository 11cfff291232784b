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


# ---- merge ----
@app.command("merge")
def _merge(
    base: str = typer.Option(..., "--base", help="Base model: local HF dir or hub id."),
    adapter: list[str] = typer.Option(..., "--adapter", help="PEFT LoRA adapter dir or hub id; repeat to stack."),
    weight: list[float] = typer.Option(
        None, "--weight", help="Scale of each adapter's change, one per --adapter in order (default 1)."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory (refused if it exists, unless --force)."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: the base's)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 2GB, 500MB."),
    template: str = typer.Option(None, "--template", help="Chat-template family to write (default: detected)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Merge LoRA adapters into a base model, streaming one tensor at a time (equals PEFT merge_and_unload)."""
    from exporter.merge import merge

    merge(
        base, adapter, weight or None, out, dtype=dtype, max_shard_size=max_shard_size, force=force, template=template
    )


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

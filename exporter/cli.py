"""The `exporter` command line: parses arguments and calls one stage function; nothing else lives here."""

from __future__ import annotations

import sys

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


@app.command(
    "train",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Fine-tune (LoRA or full; stages sft, pt): exporter train CONFIG.yaml [key=value ...], or LLaMA-Factory "
    "flags: exporter train --stage sft --do_train --model_name_or_path M --dataset a,b --output_dir OUT ...",
)
def train_cmd(ctx: typer.Context) -> None:
    from exporter import train

    if not ctx.args:
        raise UserError("exporter train: give CONFIG.yaml [key=value ...] or --key value flags (see --help)")
    train.main(list(ctx.args))


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

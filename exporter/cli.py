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


# quantize (exporter/quantize.py)
@app.command("quantize")
def _quantize(
    model: str = typer.Argument(..., help="HF model dir (or hub id) to quantize, e.g. the output of `merge`."),
    method: str = typer.Option(..., "--method", help="gptq | awq (gptqmodel) | bnb4 | bnb8 (bitsandbytes)."),
    out: str = typer.Option(..., "--out", help="Output dir (written atomically)."),
    bits: int | None = typer.Option(None, "--bits", help="4 or 8 (gptq); awq/bnb4: 4; bnb8: 8."),
    group_size: int | None = typer.Option(None, "--group-size", help="GPTQ/AWQ group size (default 128; -1: per row)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Calibration dataset name(s) from dataset_info.json."),
    dataset_dir: str | None = typer.Option(None, "--dataset-dir", help="Dir holding dataset_info.json (default data)."),
    template: str | None = typer.Option(None, "--template", help="Chat template family (default: detected)."),
    samples: int = typer.Option(128, "--samples", help="Calibration blocks (at most)."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per calibration block."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration order and quantization."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output dir."),
) -> None:
    """Quantize an HF model to GPTQ, AWQ or bitsandbytes nf4/int8, calibrated on your data through its chat template."""
    from exporter.quantize import QuantizeOptions, quantize

    quantize(QuantizeOptions(model, method, out, bits, group_size, dataset, dataset_dir, template, samples, max_length,
                             seed, force))  # fmt: skip


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

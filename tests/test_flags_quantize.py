"""`exporter quantize --method bnb4/bnb8` with a calibration flag (--samples, --max-length, --seed): bitsandbytes
quantizes at load time without calibration, so the flag would change nothing; it is refused in one line, as
--dataset and --group-size already were, and before anything is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exporter.errors import UserError
from exporter.quantize import QuantizeOptions, check_options


@pytest.mark.parametrize(("field", "value", "flag"), [("samples", 64, "--samples"), ("max_length", 128, "--max-length"),
                                                      ("seed", 3, "--seed")])  # fmt: skip
@pytest.mark.parametrize("method", ["bnb4", "bnb8"])
def test_a_calibration_flag_with_bitsandbytes_is_refused(method: str, field: str, value: int, flag: str) -> None:
    opts = QuantizeOptions(model="m", method=method, out="o", **{field: value})
    with pytest.raises(UserError, match=f"^{flag} do nothing with --method {method}: "):
        check_options(opts)
    assert check_options(QuantizeOptions(model="m", method=method, out="o")) == (int(method[-1]), None)


def test_the_cli_refuses_it_before_loading_anything(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "exporter", "quantize", str(tmp_path / "absent"), "--method", "bnb4",
                        "--out", str(tmp_path / "q"), "--samples", "32"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: --samples do nothing with --method bnb4"), r.stderr
    assert not (tmp_path / "q").exists()

"""verify's `modelfile` row: a FROM that is a file must be a GGUF verify checked, and the type the Modelfile's name
says. `ollama create` imports whatever file FROM names (Ollama's parser.CreateRequest: a path is read as is), so a
FROM edited to another type's GGUF, or left at a stale copy from an earlier export, would ship a file no other row
looked at."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import require_llama_cpp

from exporter import verify as V
from exporter.verify.modelfile import check_modelfiles

FAST = {"prompts": 1, "max_new_tokens": 4, "ctx": 64, "max_windows": 2}


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """The qwen2 fixture's f16 and q8_0 GGUFs and Modelfiles, as the gguf stage writes them."""
    require_llama_cpp()
    from exporter import gguf, templates

    root = tmp_path_factory.mktemp("verify-more-modelfile")
    merged = root / "merged"
    shutil.copytree(tiny_model("qwen2"), merged)
    tpl = templates.resolve(merged, "qwen-2.5")
    templates.write_into(merged, tpl)
    res = gguf.export(merged, ["f16", "q8_0"], tpl, root / "gguf")
    return SimpleNamespace(merged=merged, files=res.files, mfs=res.modelfiles, root=root)


def _rows(paths: list[Path], ggufs: list[Path]):
    return check_modelfiles([V.parse_modelfile(p) for p in paths], [V.read_gguf(g) for g in ggufs])


def _edited(mf: Path, out: Path, from_: str) -> Path:
    """`mf` with its FROM line replaced by `from_`, written to `out`."""
    lines = [f"FROM {from_}" if ln.startswith("FROM ") else ln for ln in mf.read_text().splitlines()]
    out.write_text("\n".join(lines) + "\n")
    return out


def test_from_must_be_the_verified_gguf_of_the_named_type(export, tmp_path: Path) -> None:
    """The gguf stage's own Modelfiles pass and say which file FROM is; Modelfile.f16 edited to FROM the q8_0 file
    fails naming both types; a stale GGUF from an earlier export (same name, other bytes) fails; a byte-identical
    copy passes as "the same bytes"; with no GGUF given the FROM is a warning (not verified); verify reports it."""
    f16, q8 = export.files["f16"], export.files["q8_0"]
    both = [f16, q8]
    named = _edited(export.mfs["f16"], tmp_path / "Modelfile.f16", str(q8))  # the f16 Modelfile's FROM -> the q8_0
    stale_dir = tmp_path / "earlier"
    stale_dir.mkdir()
    stale = stale_dir / f16.name
    data = bytearray(f16.read_bytes())
    data[-1] ^= 0xFF  # another model's (or run's) weights under the same name
    stale.write_bytes(bytes(data))
    mf = _edited(export.mfs["f16"], tmp_path / "Modelfile.stale", f"./earlier/{f16.name}")
    opts = V.VerifyOptions(merged=export.merged, ggufs=both, modelfiles=[named, mf], template="qwen-2.5", **FAST)
    rep = V.verify(opts)
    rows = {(c.target, c.status) for c in rep.checks if c.check == "modelfile"}
    assert rows == {(named.name, "fail"), (mf.name, "fail")} and not rep.passed, rows

    good = _rows([export.mfs["f16"], export.mfs["q8_0"]], both)
    assert [r.status for r in good] == ["pass", "pass"], [r.detail for r in good]
    assert f"is the verified {f16.name} (the same file)" in good[0].detail
    assert f"is the verified {q8.name} (the same file)" in good[1].detail

    plain = _edited(export.mfs["f16"], tmp_path / "Modelfile", str(q8))  # a name that says no type
    (row,) = _rows([plain], both)
    assert row.status == "pass" and f"is the verified {q8.name}" in row.detail, row.detail
    (row,) = _rows([named], both)
    assert row.status == "fail" and "a q8_0 GGUF, but the Modelfile's name says f16" in row.detail, row.detail

    (row,) = _rows([mf], both)
    assert row.status == "fail" and f"none of the GGUFs verified here ({f16.name}, {q8.name})" in row.detail

    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(f16, copy_dir / f16.name)
    (row,) = _rows([_edited(export.mfs["f16"], copy_dir / "Modelfile.f16", f"./{f16.name}")], both)
    assert row.status == "pass" and "(the same bytes)" in row.detail, row.detail

    (row,) = _rows([export.mfs["f16"]], [])
    assert row.status == "warn" and "was not verified" in row.detail

"""exporter export says in one line what it does with `resize_vocab: true`, a key LF's export YAML repeats from
training (it was accepted silently: the README said "checked, not acted on", the run said nothing)."""

from __future__ import annotations

import pytest

from exporter import export, lf_args


@pytest.mark.parametrize(
    ("over", "said"), [(["resize_vocab=true"], True), (["resize_vocab=false"], False), ([], False)]
)
def test_resize_vocab_gets_its_note(tmp_path, capsys, over: list[str], said: bool) -> None:
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"model_name_or_path: m\nadapter_name_or_path: a\nexport_dir: {tmp_path / 'o'}\n")
    parsed, given = lf_args.export_config_from_args([str(cfg), *over])
    export._notes(parsed, given)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note: resize_vocab")]
    assert len(notes) == int(said), notes
    if said:
        assert "the vocabulary size is that of the embeddings the adapter saved" in notes[0]

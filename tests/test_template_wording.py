"""What the chat-template lines say when --template replaced the model's Jinja (or the model had none)."""

from __future__ import annotations

from pathlib import Path

from test_derive import with_template

from exporter.templates import resolve


def test_lf_template_that_replaces_the_jinja_is_named(tiny_model) -> None:
    tpl = resolve(tiny_model("qwen2"), "chatml")
    text = "\n".join([tpl.description, *tpl.notes])
    assert "the model's own Jinja" not in text and "LLaMA-Factory's Jinja for 'chatml'" in text, text
    kept = resolve(tiny_model("qwen2"), "qwen")  # LF keeps the model's own: said as before
    assert any("the model's own chat template is kept" in n for n in kept.notes), kept.notes


def test_lf_template_on_a_model_without_one(tiny_model, tmp_path: Path) -> None:
    model = with_template(tiny_model("qwen2"), "", tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    tpl = resolve(model, "qwen")
    text = "\n".join(tpl.notes)
    assert "the model's own Jinja" not in text and "the model has no chat template" in text, text

"""gguf's refusals: each is the only thing printed (no template lines before it), and `--force` replaces only a
previous gguf output, never a training run's dir or a merged model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAMILIES, random_lora

from exporter import gguf
from exporter.errors import UserError


def _ours(path: Path, stage: str) -> Path:
    (path / "checkpoint-2").mkdir(parents=True)
    (path / "exporter_manifest.json").write_text(json.dumps({"stage": stage, "outputs": []}))
    return path


def test_existing_out_is_the_only_line(tiny_model, tmp_path):
    """The CLI case the tester hit: `gguf --out <existing>` printed the template lines first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = subprocess.run([sys.executable, "-m", "exporter", "gguf", str(tiny_model("llama3")), "--out", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and lines == [f"error: {out} already exists; pass --force to replace it"], lines


def test_refusals_print_nothing_before_them(tiny_model, tmp_path, capfd):
    """Every refusal of `gguf.run`, model or adapter mode, before any line of output."""
    llama = tiny_model("llama3")
    ad = random_lora(llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    cases = [
        (gguf.GGUFOptions(str(llama), out=str(foreign)), "already exists"),
        (gguf.GGUFOptions(str(llama), out=str(foreign), force=True), "is not an exporter output"),
        (gguf.GGUFOptions(str(llama), out=str(_ours(tmp_path / "run", "train")), force=True), "exporter train output"),
        (gguf.GGUFOptions(str(llama), out=str(_ours(tmp_path / "m", "merge")), force=True), "exporter merge output"),
        (gguf.GGUFOptions(str(llama), adapter=str(ad), out=str(tmp_path / "run"), force=True), "train output"),
        (gguf.GGUFOptions(str(llama), adapter=str(ad), types=["q8_0"], out=str(tmp_path / "g")), "with --adapter"),
        (gguf.GGUFOptions(str(llama), template="nope", out=str(tmp_path / "g")), "unknown chat template"),
    ]
    capfd.readouterr()
    for opts, message in cases:
        with pytest.raises(UserError, match=message):
            gguf.run(opts)
        printed = capfd.readouterr()
        assert printed.out == "" and printed.err == "", (message, printed)
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "m" / "checkpoint-2").is_dir()
    assert not (tmp_path / "g").exists()


def test_force_replaces_a_previous_gguf_output(tiny_model, tmp_path):
    llama = tiny_model("llama3")
    out = tmp_path / "g"
    gguf.run(gguf.GGUFOptions(str(llama), out=str(out)))
    (out / "marker").write_text("x")
    gguf.run(gguf.GGUFOptions(str(llama), out=str(out), force=True))
    assert not (out / "marker").exists() and (out / "Modelfile.f16").is_file()


def _edited(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of model dir `src` whose config.json `edit` changed in place."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit setting the dotted key `path` (`rope_parameters.rope_theta`) of a config to `value`."""
    *parents, last = path.split(".")

    def edit(cfg: dict) -> None:
        for key in parents:
            cfg = cfg.setdefault(key, {})
        cfg[last] = value

    return edit


# config.json values transformers' AutoConfig refuses: gguf wrote a GGUF without the untied lm_head for the first
# and gave a traceback (struct.error, numpy TypeError) for most of the rest
WRONG_TYPES = [
    ("tie_word_embeddings", "false", "tie_word_embeddings is 'false'; expected true or false"),
    ("tie_word_embeddings", 0, "tie_word_embeddings is 0; expected true or false"),
    ("vocab_size", None, "vocab_size is null; expected a positive integer"),
    ("rms_norm_eps", "x", "rms_norm_eps is 'x'; expected a number"),
    ("rms_norm_eps", True, "rms_norm_eps is True; expected a number"),
    ("rms_norm_eps", None, "rms_norm_eps is null; expected a number"),
    ("max_position_embeddings", "4k", "max_position_embeddings is '4k'; expected a positive integer"),
    ("max_position_embeddings", 4096.0, "max_position_embeddings is 4096.0; expected a positive integer"),
    ("intermediate_size", None, "intermediate_size is null; expected a positive integer"),
    ("rope_parameters.rope_theta", "abc", "rope_parameters.rope_theta is 'abc'; expected a number"),
    ("rope_parameters.factor", [8], r"rope_parameters.factor is \[8\]; expected a number"),
    ("rope_parameters.rope_type", 3, "rope_parameters.rope_type is 3; expected a string"),
    ("rope_parameters", 5, "rope_parameters is 5; expected a JSON object"),
    ("rope_scaling", "linear", "rope_scaling is 'linear'; expected a JSON object"),
    ("num_experts", "8", "num_experts is '8'; expected a non-negative integer"),
    ("architectures", "LlamaForCausalLM", "architectures is 'LlamaForCausalLM'; expected a list of strings"),
    ("text_config", [], r"text_config is \[\]; expected a JSON object"),
    ("text_config.vocab_size", "x", "text_config.vocab_size is 'x'; expected a positive integer"),
]


@pytest.mark.parametrize(("key", "value", "message"), WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, _ in WRONG_TYPES])
def test_wrongly_typed_config_is_one_line(tiny_model, tmp_path, capfd, key, value, message):
    model = _edited(tiny_model("llama3"), tmp_path / "m", _set(key, value))
    capfd.readouterr()
    with pytest.raises(UserError, match=f"^{re.escape(str(model / 'config.json'))}: {message}$"):
        gguf.run(gguf.GGUFOptions(str(model), out=str(tmp_path / "g")))
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size"])
def test_missing_size_key_is_one_line(tiny_model, tmp_path, key):
    """A size every supported family's config carries, left out: one line (intermediate_size was a KeyError)."""
    model = _edited(tiny_model("llama3"), tmp_path / "m", lambda cfg: cfg.pop(key))
    with pytest.raises(UserError, match=f"^{re.escape(str(model / 'config.json'))}: no {key}; expected a positive"):
        gguf.run(gguf.GGUFOptions(str(model), out=str(tmp_path / "g")))
    assert not (tmp_path / "g").exists()


def test_wrongly_typed_config_cli(tiny_model, tmp_path):
    """The tester's case through the CLI: one line, exit 2, nothing written (it was exit 0 and no output.weight)."""
    model = _edited(tiny_model("llama3"), tmp_path / "tw", _set("tie_word_embeddings", "false"))
    r = subprocess.run([sys.executable, "-m", "exporter", "gguf", str(model), "--out", str(tmp_path / "g")],
                       capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    want = f"error: {model / 'config.json'}: tie_word_embeddings is 'false'; expected true or false"
    assert r.returncode == 2 and lines == [want], lines
    assert not (tmp_path / "g").exists()


# what transformers accepts, and published configs say: null where a config class allows it, ints for floats
ACCEPTED = [
    ("rope_scaling", None),
    ("rope_parameters", None),
    ("head_dim", None),
    ("sliding_window", None),
    ("tie_word_embeddings", None),
    ("num_experts", None),
    ("rope_theta", 10000),
    ("rope_parameters.rope_theta", 500000),
    ("rope_parameters.attention_factor", None),
    ("rms_norm_eps", 0),
    ("rms_norm_eps", 1e-06),
]


@pytest.mark.parametrize(("key", "value"), ACCEPTED, ids=[f"{k}={v!r}" for k, v in ACCEPTED])
def test_valid_config_values_are_accepted(tiny_model, tmp_path, key, value):
    from exporter.converters import gguf_convert

    model = _edited(tiny_model("llama3"), tmp_path / "m", _set(key, value))
    gguf_convert.plan(model)[2].close()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_fixture_config_passes_the_checks(tiny_model, family):
    from exporter.converters import gguf_arch, gguf_convert

    model = tiny_model(family)
    gguf_convert.plan(model)[2].close()
    gguf_arch.check_types(model / "config.json", {"text_config": json.loads((model / "config.json").read_text())})


def test_tokenizer_refusals_print_nothing_before_them(tiny_model, tmp_path, capfd):
    """The vocabulary is read before the template lines and the progress bar (it was read inside the conversion)."""
    small = _edited(tiny_model("llama3"), tmp_path / "vs", _set("vocab_size", 12))
    none = _edited(tiny_model("llama3"), tmp_path / "nt", lambda cfg: None)
    (none / "tokenizer.json").unlink()
    capfd.readouterr()
    for model, message in ((small, "tokenizer has id 915 but config vocab_size is 12"),
                           (none, "no tokenizer.json or tokenizer.model")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            gguf.run(gguf.GGUFOptions(str(model), out=str(tmp_path / "g")))
        printed = capfd.readouterr()
        assert printed.out == "" and printed.err == "", (message, printed)
        assert not (tmp_path / "g").exists()


def test_vocabulary_is_read_once(tiny_model, tmp_path, monkeypatch):
    """Checking the tokenizer first costs nothing extra: the conversion uses the vocabulary read for the check."""
    from exporter.converters import gguf_vocab

    calls = []
    build = gguf_vocab.build_vocab
    monkeypatch.setattr(gguf_vocab, "build_vocab", lambda *a, **k: calls.append(a) or build(*a, **k))
    gguf.run(gguf.GGUFOptions(str(tiny_model("llama3")), out=str(tmp_path / "g")))
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("dir_name", "stem"),
    [
        ("ünï 模型", "uni"),
        ("模型", "model"),
        ("Straße-7B", "Stra-e-7B"),
        ("my out (v2)", "my-out--v2"),
        ("x" * 200, "x" * 80),
    ],
)
def test_default_names_are_ascii_and_pass_the_name_check(tmp_path, dir_name, stem):
    """The default Ollama name and GGUF stem of a non-ASCII dir: one Ollama (and `check_ollama_name`) accepts."""
    assert gguf._safe_name(dir_name) == stem
    names = gguf.ollama_names(tmp_path / dir_name, ["f16"])
    assert names == {"f16": f"{stem.lower()}:f16"}
    gguf.check_ollama_name(names["f16"].split(":")[0])

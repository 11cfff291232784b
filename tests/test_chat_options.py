"""`exporter chat` / `serve` options read before any model loads: LLaMA-Factory's inference YAML typed as LF types its
keys (one line naming the file, key and type expected), a broken `--template file.jinja` refused at startup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from exporter.chat import read_infer_yaml
from exporter.errors import UserError


def _yaml(tmp_path: Path, extra: str) -> Path:
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'model'}\n{extra}\n", encoding="utf-8")
    return cfg


@pytest.mark.parametrize(
    "extra,message",
    [
        ("max_new_tokens: abc", "max_new_tokens: expected an integer, got 'abc'"),
        ("vllm_maxlen: big", "vllm_maxlen: expected an integer, got 'big'"),
        ("num_beams: two", "num_beams: expected an integer, got 'two'"),
        ("top_k: 2.5", "top_k: expected an integer, got 2.5"),
        ("top_k: true", "top_k: expected an integer, got True"),
        ("temperature: warm", "temperature: expected a number, got 'warm'"),
        ("do_sample: 'no'", "do_sample: expected true or false, got 'no'"),
        ("skip_special_tokens: 0", "skip_special_tokens: expected true or false, got 0"),
        ("vllm_maxlen: 0", "vllm_maxlen: expected a positive integer, got 0"),
    ],
)
def test_inference_yaml_values_are_typed(tmp_path: Path, extra: str, message: str) -> None:
    cfg = _yaml(tmp_path, extra)
    with pytest.raises(UserError) as e:
        read_infer_yaml(cfg)
    assert str(e.value) == f"{cfg}: {message}"


def test_inference_yaml_numbers_read_as_lf_types_them(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "top_k: 7\nmax_new_tokens: '64'\ntemperature: 1e-3\ntop_p: 1\nvllm_maxlen: 2048\n"
                "num_beams: 1\ndo_sample: true\nskip_special_tokens: false")  # fmt: skip
    got = read_infer_yaml(cfg)
    assert got.sampling == {"top_k": 7, "max_new_tokens": 64, "temperature": 0.001, "top_p": 1.0,
                            "skip_special_tokens": False}  # fmt: skip
    assert type(got.sampling["top_p"]) is float and got.load["ctx"] == 2048


def test_inference_yaml_takes_key_value_overrides(tmp_path: Path) -> None:
    """`exporter chat infer.yaml max_new_tokens=8` as `llamafactory-cli chat infer.yaml max_new_tokens=8`: the value
    over the file's (it was "Got unexpected extra argument"); a bad one is named as the override's."""
    from exporter.chat import LF_SAMPLING, resolve_options

    cfg = _yaml(tmp_path, "max_new_tokens: 64\ntemperature: 0.5")
    got = read_infer_yaml(cfg, ["max_new_tokens=8", "default_system=Be brief."])
    assert got.sampling == {"max_new_tokens": 8, "temperature": 0.5} and got.system == "Be brief."
    with pytest.raises(UserError, match=rf"^{cfg} with top_k=x: top_k: expected an integer, got 'x'$"):
        read_infer_yaml(cfg, ["top_k=x"])
    with pytest.raises(UserError, match=r"^max_new_tokens=8: key=value overrides apply to an inference YAML"):
        resolve_options(str(tmp_path), {}, {}, None, LF_SAMPLING, ["max_new_tokens=8"])


@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_overrides_reach_chat_and_serve(tmp_path: Path, verb: str) -> None:
    """Through the CLI, chat and serve take the overrides (a bad one: one line naming it, before any model loads)."""
    cfg = _yaml(tmp_path, "max_new_tokens: 64")
    r = subprocess.run([sys.executable, "-m", "exporter", verb, str(cfg), "max_new_tokens=abc"], input="hi\n",
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: {cfg} with max_new_tokens=abc: max_new_tokens: expected an integer, "
                                     "got 'abc'"]  # fmt: skip


@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_bad_inference_yaml_is_one_line_before_loading(tmp_path: Path, verb: str) -> None:
    cfg = _yaml(tmp_path, "max_new_tokens: abc")
    r = subprocess.run([sys.executable, "-m", "exporter", verb, str(cfg)], input="hi\n", capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: {cfg}: max_new_tokens: expected an integer, got 'abc'"]


@pytest.mark.parametrize("verb", ["chat", "serve", "predict"])
def test_broken_jinja_template_is_one_line_at_startup(tiny_model, tmp_path: Path, verb: str) -> None:
    """Before, chat accepted it and printed `[error: ...]` for every question, exit 0."""
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}{% endfor %\n", encoding="utf-8")
    model = str(tiny_model("qwen2"))
    if verb == "predict":
        args = ["--model_name_or_path", model, "--template", str(broken), "--eval_dataset", "identity",
                "--dataset_dir", str(ROOT / "data"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    else:
        args = [model, "--template", str(broken)]
    r = subprocess.run([sys.executable, "-m", "exporter", verb, *args], input="hi\n", capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: {broken}: not a valid Jinja chat template: line 1: expected token "
                                     "'end of statement block', got '%'"]  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_piped_chat_writes_one_answer_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin not a terminal: the k-th output line answers the k-th prompt, whatever the answer holds (newlines
    escaped as \\n, backslashes doubled), and an answer that fails is `[error: ...]` on its line, partial text
    dropped. Before, answers were written raw, so a multi-line answer took several lines."""
    import contextlib
    import io
    from types import SimpleNamespace

    from exporter import chat, engine
    from exporter.engine import EngineError, LoadOptions

    answers = {"one": ["first line\n", "second \\ line"], "two": ["half", "!"], "three": ["a\r\nb\n"]}

    class Engine:
        chat_format = SimpleNamespace(require=lambda: None)
        n_ctx = 1 << 20

        def encode_chat(self, messages: list[dict]) -> list[dict]:
            return messages

        def stream(self, messages: list[dict], sampling: object):
            for k, text in enumerate(answers[messages[-1]["content"]]):
                if messages[-1]["content"] == "two" and k == 1:
                    raise EngineError("the model's logits are not finite\nat token 2")
                yield SimpleNamespace(text=text)

    monkeypatch.setattr(engine, "load", lambda opts: contextlib.nullcontext(Engine()))
    out = io.StringIO()
    chat.chat(chat.ChatOptions(LoadOptions("m"), stdin=io.StringIO("one\n\ntwo\nthree\n"), stdout=out))
    assert out.getvalue().split("\n") == [
        "first line\\nsecond \\\\ line",
        "[error: the model's logits are not finite\\nat token 2]",
        "a\\r\\nb\\n",
        "",
    ]


@pytest.mark.parametrize(
    "flag,message",
    [("--min-p", "min_p must be between 0 and 1, got 1.5"), ("--presence-penalty", "presence_penalty must be"),
     ("--frequency-penalty", "frequency_penalty must be")],
)  # fmt: skip
def test_chat_takes_the_sampling_flags_serve_takes(tmp_path: Path, flag: str, message: str) -> None:
    """`--min-p`, `--presence-penalty`, `--frequency-penalty` reach chat's sampling: out of range, one line before
    any model loads (before: no such option)."""
    r = subprocess.run([sys.executable, "-m", "exporter", "chat", str(tmp_path / "model"), flag, "2.5" if "pen" in flag
                        else "1.5"], input="hi\n", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {message}") and len(r.stderr.splitlines()) == 1, r.stderr


def test_chat_min_p_one_is_greedy(tiny_model) -> None:
    """`--min-p 1` keeps only the top token: a sampled answer, hot enough to leave greedy without it, equals the
    greedy one."""
    model = str(tiny_model("qwen2"))
    common = [sys.executable, "-m", "exporter", "chat", model, "--max-new-tokens", "12"]

    def answer(*flags: str) -> str:
        r = subprocess.run([*common, *flags], input="hello there\n", capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    greedy = answer("--temperature", "0")
    assert answer("--temperature", "5", "--top-k", "0", "--top-p", "1", "--min-p", "1", "--seed", "3") == greedy
    assert answer("--temperature", "5", "--top-k", "0", "--top-p", "1", "--seed", "3") != greedy

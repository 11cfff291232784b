"""`exporter chat` driven through stdin and through a pseudo-terminal, on base, base + adapter and GGUF; and
LLaMA-Factory's inference YAML read unchanged. References: the engine-independent PEFT/llama-cpp answers of the
trained adapter (see test_serve.py) and transformers' greedy decoding for the base model."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_models import QA, peft_answers, peft_greedy

GREEDY = ["--temperature", "0", "--max-new-tokens", "24"]


pytestmark = pytest.mark.slow  # trains an adapter (shared with test_serve) and runs the CLI


def _chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _base_greedy(base: Path, conversation: list[dict[str, str]]) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    g = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["adapter", "gguf"])
def test_stdin_one_prompt_a_line_with_history_and_clear(tool_models, which: str) -> None:
    m = tool_models
    model = [str(m.base), "--adapter", str(m.lora)] if which == "adapter" else [str(m.gguf)]
    questions = [q for q, _ in QA[:3]]
    r = _chat(*model, *GREEDY, stdin="\n".join([questions[0], "clear", questions[1], "", questions[2], "exit",
                                                 "never read"]) + "\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    q0, q1, q2 = ({"role": "user", "content": q} for q in questions)
    a0, a1 = peft_greedy(m.base, m.lora, [[q0], [q1]])
    (a2,) = peft_greedy(m.base, m.lora, [[q1, {"role": "assistant", "content": a1}, q2]])  # history kept after clear
    assert r.stdout.splitlines() == [a0, a1, a2]
    assert r.stderr == ""  # no banners, warnings or progress bars


def test_stdin_base_model_keeps_history(tool_models) -> None:
    r = _chat(str(tool_models.base), *GREEDY, "--system", "Be brief.", stdin="hello\nand then?\n")
    assert r.returncode == 0, r.stderr
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    first = _base_greedy(tool_models.base, conv)
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = _base_greedy(tool_models.base, conv)
    # one answer a line: this base model answers with newlines, written escaped
    assert "\n" in first + second
    assert r.stdout == f"{_escaped(first)}\n{_escaped(second)}\n"


def _escaped(answer: str) -> str:
    return answer.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _read_until(fd: int, marker: str, timeout: float = 300) -> str:
    out, deadline = b"", time.time() + timeout
    while marker.encode() not in out:
        if time.time() > deadline:
            raise AssertionError(f"no {marker!r} in {out.decode(errors='replace')!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


@contextlib.contextmanager
def terminal(*args: str) -> Iterator[int]:
    """`python *args` on a pseudo-terminal: yields its fd; on leaving, the child must have exited 0 (killed when
    the test failed first)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: on the terminal
        os.execv(sys.executable, [sys.executable, *args])
    try:
        yield fd
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_pseudo_terminal_session(tool_models) -> None:
    with terminal("-m", "exporter", "chat", str(tool_models.gguf), *GREEDY) as fd:
        assert "use `clear` to remove the history" in _read_until(fd, "User: ")
        os.write(fd, f"{QA[2][0]}\r".encode())
        assert f"Assistant: {peft_answers(tool_models.base, tool_models.lora)[QA[2][0]]}" in _read_until(fd, "User: ")
        os.write(fd, b"clear\r")
        assert "History has been removed." in _read_until(fd, "User: ")
        os.write(fd, b"exit\r")


def test_llamafactory_inference_yaml(tool_models, tmp_path: Path) -> None:
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(
        f"model_name_or_path: {tool_models.base}\nadapter_name_or_path: {tool_models.lora}\ntemplate: qwen\n"
        "infer_backend: huggingface\ntrust_remote_code: true\ndo_sample: false\nmax_new_tokens: 24\n"
        "default_system: null\n",
        encoding="utf-8",
    )
    r = _chat(str(cfg), stdin=f"{QA[2][0]}\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{peft_answers(tool_models.base, tool_models.lora)[QA[2][0]]}\n"
    assert "trust_remote_code" in r.stderr  # said once: it has no effect here
    cfg.write_text(f"model_name_or_path: {tool_models.base}\ntemprature: 0.1\n", encoding="utf-8")
    r = _chat(str(cfg), stdin="hi\n")
    assert r.returncode == 2 and "did you mean 'temperature'" in r.stderr and "Traceback" not in r.stderr
    cfg.write_text(f"model_name_or_path: {tool_models.base}\ninfer_backend: sglang\n", encoding="utf-8")
    r = _chat(str(cfg), stdin="hi\n")
    assert r.returncode == 2 and "infer_backend 'sglang'" in r.stderr


def test_nan_logits_are_one_line_and_the_chat_goes_on(tiny_model, tmp_path: Path) -> None:
    """A question that makes the model's logits NaN: one `[error: ...]` line in its answer's place, then the next
    question is answered as it is alone (the failed turn is not kept in the history)."""
    from engine_models import CLEAN, POISONED, nan_token_model

    model = tmp_path / "nan"
    nan_token_model(tiny_model("llama3"), model)
    alone = _chat(str(model), *GREEDY, stdin=f"{CLEAN[0]}\n")
    r = _chat(str(model), *GREEDY, stdin=f"{POISONED}\n{CLEAN[0]}\n")
    assert r.returncode == 0 and alone.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[error: the model's logits are not finite (nan) at answer token 1: its weights are broken; this answer "
        "stops here]",
        *alone.stdout.splitlines(),
    ]
    assert r.stderr == ""

"""LoadOptions checked in one place (engine/core.py): a value no backend takes is one line, an option the chosen
backend does not use is one note, and what a backend can honour it honours (--ctx and --threads on hf, --ctx 0 as
llama.cpp's n_ctx 0); a missing .gguf path says the GGUF file was not found."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

from exporter.engine import ContextOverflow, LoadOptions, Sampling, load  # noqa: E402
from exporter.errors import UserError  # noqa: E402


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"dtype": "weird"}, "--dtype 'weird': expected one of auto, fp32, bf16, fp16"),
        ({"threads": -3}, "--threads -3: expected a positive number of CPU threads"),
        ({"threads": 0}, "--threads 0: expected a positive number of CPU threads"),
        ({"ctx": -1}, "--ctx -1: expected a number of tokens (0: the model's training context)"),
    ],
)
@pytest.mark.parametrize("which", ["gguf", "hf"])
def test_bad_values_are_one_line_on_every_backend(tiny_gguf, tiny_model, which: str, kw: dict, says: str) -> None:
    model = str(tiny_gguf) if which == "gguf" else str(tiny_model("qwen2"))
    with pytest.raises(UserError) as e:
        load(LoadOptions(model, **kw))
    assert str(e.value) == says


def test_gguf_notes_what_it_cannot_use_and_honours_ctx_0(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    import llama_cpp

    with load(LoadOptions(str(tiny_gguf), dtype="fp16", device="cuda", max_seqs=1)) as eng:
        assert eng.kind == "gguf"
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --dtype fp16 has no effect on a GGUF model (llama.cpp runs it on the CPU, with the tensor "
                   "types the file stores)", "note: --device cuda has no effect on a GGUF model (llama.cpp runs it on "
                   "the CPU, with the tensor types the file stores)"]  # fmt: skip
    ref = llama_cpp.Llama(str(tiny_gguf), n_ctx=0, verbose=False)  # llama.cpp's n_ctx 0: the training context
    try:
        want = ref.n_ctx()
    finally:
        ref.close()
    with load(LoadOptions(str(tiny_gguf), ctx=0, max_seqs=1)) as eng:
        assert eng.n_ctx == want != 4096
    with pytest.raises(UserError, match=r"^GGUF file .*nope\.gguf not found$"):
        load(LoadOptions(str(tmp_path / "nope.gguf")))


def test_hf_honours_ctx_and_threads(tiny_model) -> None:
    import torch

    with load(LoadOptions(str(tiny_model("qwen2")), ctx=16, threads=3, max_seqs=1)) as eng:
        assert eng.n_ctx == 16 and torch.get_num_threads() == 3
        prompt = eng.encode_chat([{"role": "user", "content": "word " * 60}])
        with pytest.raises(ContextOverflow, match=rf"^the prompt is {len(prompt)} tokens; the context holds 16$"):
            eng.generate([prompt], Sampling(max_new_tokens=4))
        short = eng.tokenize("a b c")
        assert len(eng.generate([short], Sampling(max_new_tokens=50, ignore_eos=True))[0].token_ids) == 16 - len(short)

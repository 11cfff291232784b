"""Run llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist) unchanged, except for one lookup.

    python tests/_reference_convert.py CONVERTER_DIR PRE_NAME -- <convert_hf_to_gguf.py arguments>

llama.cpp names a byte-level BPE pre-tokenizer by hashing how the tokenizer splits a check text and looking the hash
up in a table of released vocabularies. The sdist ships no GLM-4, tekken, OLMo 2 or Granite vocabulary, so the test
fixtures of those families carry vocabularies trained here with the family's pre-tokenizer, which no table knows.
Only when the converter's own lookup fails (NotImplementedError) does it get PRE_NAME: the name its table gives the
real model's vocabulary. Everything else is the converter's own work, and the tokenization tests check that llama.cpp
splits text exactly like the HF tokenizer under that name.
"""

from __future__ import annotations

import runpy
import sys

converter_dir, pre_name, sep, *args = sys.argv[1:]
assert sep == "--", "usage: _reference_convert.py CONVERTER_DIR PRE_NAME -- ARGS"
sys.path.insert(0, converter_dir)

from conversion import base  # noqa: E402  (the converter's package, importable only from its dir)

lookup = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer) -> str:
    try:
        return lookup(self, tokenizer)
    except NotImplementedError:
        if pre_name == "-":
            raise
        return pre_name


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [f"{converter_dir}/convert_hf_to_gguf.py", *args]
runpy.run_path(sys.argv[0], run_name="__main__")

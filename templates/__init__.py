"""Chat-template families as data (installed as `exporter.families`; read by `exporter.templates`).

One YAML file per family:

- `name`, `description`
- `jinja`: the HF `chat_template` written into exported tokenizers and the GGUF
- `ollama`: the Modelfile `TEMPLATE` (Go text/template over `.Messages`, `.Tools`, `.Think`, ...; no leading BOS,
  Ollama adds it at tokenization)
- `stop`: Modelfile `PARAMETER stop` strings; `eot_tokens`: special tokens that end an answer (EOG ids in the
  GGUF, `eos_token_id` in generation_config.json); `{eos_token}` stands for the tokenizer's eos (base formats)
- `default_system`, `bos_token`/`eos_token` (text the Jinja renders; null = taken from the tokenizer), `tools`
- `format`: what the training renderer needs: `system` (always | optional | optional_nonempty | first_user |
  last_user), per-role patterns (`system_turn`, `user`, `user_with_system`, `assistant: [prompt, trained, tail]`,
  `generation`), `bos` (Jinja starts with BOS text), `prefix`, `alternate`, `system_mid`, `final_eos`
  (always | after_assistant), `trained_next` (role tokens that end an answer), `think`, `tool_style`.

The three renderings (training renderer, Jinja, Go) are held byte-identical by tests/test_templates.py.
"""

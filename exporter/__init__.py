"""exporter: LoRA fine-tuning to a running, verified Ollama model."""

__version__ = "0.1.0"

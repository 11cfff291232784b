"""`exporter webui`: the LLaMA-Factory-style board for the whole chain in a browser (Gradio).

Tabs: Train (`train_tab.py`), Chat (`chat_tab.py`), Export (`export_tab.py`); the top row and the language switch
are in `app.py`, the words in `locales.py`, the CLI subprocesses in `jobs.py`. Needs `pip install 'exporter[webui]'`.
"""

from exporter.webui.app import WebUIOptions, build, launch

__all__ = ["WebUIOptions", "build", "launch"]

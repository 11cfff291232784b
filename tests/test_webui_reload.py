"""Reloading the board's page prints nothing in `exporter webui`'s terminal.

Each reload ends the old page's events and starts three monitors (`train_monitor`, `eval_monitor`,
`export_monitor`, concurrency_limit=None). After every event Gradio 6.31's queue rebuilt its analytics summary
(`Queue.compute_analytics_summary`: a pandas DataFrame of up to 10,000 past events) in a worker thread, through pandas
options pandas 3 deprecates. exporter's filters (`quiet.KNOWN_WARNINGS`) hide those warnings, but pandas' own
`pandas_dtype` turns DeprecationWarning to "always" for every thread while it runs (`warnings.catch_warnings` is
process-wide), so with several events ending together the terminal printed `gradio/queueing.py:178: Pandas4Warning:
The copy keyword is deprecated ...` (seen with the real Chromium reloading the page 25 times while a run went on).
The board turns that summary off (`GRADIO_ANALYTICS_CACHE_FREQUENCY`): it serves only Gradio's monitoring dashboard,
which the board does not offer.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("gradio")


def test_events_ending_leave_no_pandas_warnings_whatever_the_filters(tmp_path: Path) -> None:
    """The board's own load event run as a reloaded page runs it, while every warning is shown (what pandas' filter
    in another thread does at the wrong moment): Gradio's queue warns nothing."""
    from gradio_client import Client
    from webui_helpers import serve

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with serve(tmp_path / "runs") as url:
            client = Client(url, verbose=False)
            for _ in range(2):  # a page, then the same page reloaded
                client.predict("en", api_name="/train_monitor")
            time.sleep(1.5)  # the queue's bookkeeping after an event runs in a worker thread
    queue_warnings = [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in seen
                      if "gradio" in Path(w.filename).parts and issubclass(w.category, DeprecationWarning)]  # fmt: skip
    assert not queue_warnings, queue_warnings

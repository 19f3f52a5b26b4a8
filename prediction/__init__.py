"""Applying a saved hybrid to many images: inputs read robustly, each result streamed to
``predictions.jsonl`` as soon as it is done, re-runs resume, Ctrl-C stops between images."""

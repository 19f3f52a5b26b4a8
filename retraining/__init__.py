"""Scheduled retraining: the workspace that keeps it safe (data manifest, champion, history,
intensity window; ``retraining.workspace``), the fixed holdout champion and challenger are
compared on (``retraining.holdout``), and training a challenger and one run
(``retraining.run``). ``pipelines.retrain`` is its command line."""

"""The benchmark's experiments: the ranking (``experiments.ranking``)."""

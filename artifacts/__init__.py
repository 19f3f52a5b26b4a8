"""Artifact files: atomic writes, SHA-256 manifests and guarded loading (``artifacts.io``).

The ground floor: every other package writes and loads its results and models through it.
"""

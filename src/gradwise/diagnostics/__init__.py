"""Diagnostics: gradient health (per-layer norms, verdicts, non-finite detection)."""

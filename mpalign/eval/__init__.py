"""Evaluation: benchmark definitions (``benchmarks``), metrics (``metrics``), Ray Data stages (``stages``) and the
report (``report``); the entry point is ``python -m mpalign.evaluate`` (see docs/evaluation.md)."""

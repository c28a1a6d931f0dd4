"""The run report: plots (matplotlib, Agg) and one self-contained HTML page, ``OUT/report.html``."""

from __future__ import annotations

from mbdl.report.html import retrieval_examples, write_report

__all__ = ["retrieval_examples", "write_report"]

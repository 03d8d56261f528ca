"""Report writers for per-modality-subset results (JSON, CSV, Markdown, PNG heatmap)."""

from app.reports.subset_report import MEAN_ROW, atomic_write_bytes, atomic_write_text, format_table, write_subset_report

__all__ = ["MEAN_ROW", "atomic_write_bytes", "atomic_write_text", "format_table", "write_subset_report"]

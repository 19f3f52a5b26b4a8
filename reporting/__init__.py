"""Reports: self-contained HTML pages with inline SVG charts, for a benchmark run
(``reporting.benchmark_report``) and for a hybrid (``reporting.hybrid_report``)."""

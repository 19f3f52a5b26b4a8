"""Reports: self-contained HTML pages with inline SVG charts, for a benchmark run
(``reporting.benchmark_report``), for a hybrid (``reporting.hybrid_report``) and for predict's
output folder (``reporting.predict_report``)."""

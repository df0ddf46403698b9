"""Benchmark evaluation: dataset readers (datasets.py), metrics (metrics.py) and the runner
(evaluate.py), on the same load_model / batch_chat every demo uses."""

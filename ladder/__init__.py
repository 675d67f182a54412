"""The quality ladder: statistics, plots, variant facts and the GPU workers (see quick_quality_test.py)."""

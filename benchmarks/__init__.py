"""The parts of bench.py (the entry point users run): timing (CUDA events, graph replay), profile
(kernel time per category), variants (what is measured), runner (the Bench class: rows, recovery,
interleaving), sections (attn, step, sweeps) and report (tables, JSON meta)."""

"""train.py's parts, shared with bench.py and tools/: config (TrainConfig, flags, presets, checks), runs
(the run folder, its lock, checkpoints, resume rules, data checks, the log), step (the training step and
how it is launched, evaluation) and common (device and process group, peak FLOP/s, lr schedule, RNG state,
signals)."""

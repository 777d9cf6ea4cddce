"""How a run computes: the training loop (top to bottom), the device, precision and compile settings, checkpoints,
weight averaging, learning-rate schedules and signal handling."""

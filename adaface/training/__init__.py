"""Training building blocks composed by the scripts in training/: losses, checkpoints, schedules."""

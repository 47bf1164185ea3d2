"""Training building blocks composed by the scripts in training/: the shared trainer (trainer.py: loop,
optimizer and expansion, DDP, checkpoints, resume, metrics, progress; its docstring says how a stage plugs in),
the stages (stage1.py), data, losses, checkpoints, schedules."""

"""The training engine, shared by both stages and free of the method: the loop (trainer: optimizer, expansion,
DDP, progress, metrics, resume), checkpoints, signals and fault injection, configs and the face data. A stage plugs in
through `trainer.run_training` (its docstring says how)."""

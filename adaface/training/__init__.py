"""Training, in two sub-packages: `engine` (the loop, checkpoints, DDP, signals, faults, metrics, configs, data;
nothing specific to AdaFace) and `method` (the two stages and their losses, built on the engine). The scripts in
training/ compose them."""

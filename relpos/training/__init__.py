"""Training: the step and optimiser, checkpoints, data/FSDP parallelism, the loop and its
metrics. The jobs that use them live in :mod:`relpos.runs`."""

"""Training: optimizers, layers, data, checkpoints, train steps, distributed training,
the training recipe."""

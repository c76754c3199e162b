"""The training stage: the shared loop, the DeepSpeed engine, losses, checkpoints and resume."""

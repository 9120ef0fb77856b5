"""Fine-tuning: recipe config, the training loop, checkpoints and metrics."""

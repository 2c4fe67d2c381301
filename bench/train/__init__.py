"""The shared trainer, its speed switches, early stopping, and multi-process training (torchrun)."""

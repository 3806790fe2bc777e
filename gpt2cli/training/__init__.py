"""Training: the trainer, its plan and set-up, the fused loss, batches, optimizers, the memory estimate, the run
folder."""

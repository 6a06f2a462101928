"""Training: one trainer for every task (trainer.py), the tasks (tasks/), the config schema
(schema.py), checkpoints, metrics, FLOP counts, the token cache, the optimiser recipe, loss weights
and masking draws."""

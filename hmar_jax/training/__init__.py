"""Training: loss weights, masking draws, optimiser recipe, next-scale and masked-prediction loops."""

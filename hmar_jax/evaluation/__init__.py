"""Sample-quality metrics with the ADM evaluator's protocol (FID, sFID, IS, precision, recall), in JAX.

inception.py: the 2015 TensorFlow InceptionV3 graph in Flax NNX; tf1_resize.py: TF1's bilinear
resize; graphdef.py: a TensorFlow-free GraphDef reader; convert.py: weights from .pb / .pth;
batches.py: .npz image batches and reference statistics; features.py: sharded, cached feature
extraction; metrics.py: the metrics themselves. The command line is hmar_jax/evaluate.py.
"""

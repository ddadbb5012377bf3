"""cedm: label-free conditional image generation (C-EDM, arXiv 2403.00570).

Pipeline stages, one module each: data, features, knn, cluster (temi, k-means), bound,
train (networks), sample, evaluate, report, sweep. Fused kernels live in csrc/ behind cedm.ops.
"""
__version__ = "0.1.0"

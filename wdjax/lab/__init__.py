"""The training lab: reference models, data, a jit-compiled train loop, checkpoints,
sweeps and cross-validation for any model, reports and the `wdjax` CLI.

It needs flax (reference models) and, for some parts, the optional extras
(scikit-learn for digits, orbax-checkpoint, matplotlib, tqdm). The core
([`wdjax`][]) never imports it.
"""

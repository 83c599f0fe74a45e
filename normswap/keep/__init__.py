"""Keeping the trained function through an inexact rewrite.

``calibrate`` (fit the new norms' affines and the readout on unlabeled data, never worse on held-out
data), ``recover`` (label-free distillation, checkpoints, keep-best), ``kinds`` (what the output is and
the measure a user reads it by), ``heldout`` (the default held-out split), ``norm_fit`` (the per-channel
affine fitted to each per-sample norm so that ``--to fold`` can fold it).
"""

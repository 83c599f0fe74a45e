"""The rewriting stage: capture a model as torch.fx graphs, find its norm sites, and fold or swap them.

``capture`` (tracing with norms as leaves) → ``sites`` (BatchNorm sites and the one fold predicate) and
``norm_sites`` (per-sample norms: GroupNorm, LayerNorm, InstanceNorm, …) → the passes: ``fold`` (exact
folds of a per-channel affine into its neighbours), ``reparam`` (parallel branches merged), ``ws_bake``
(weight standardization baked into the weights), ``swap`` (BatchNorm → a registered norm target);
``graph_ops`` says what an fx node computes, ``passes`` holds what every pass returns, ``layers`` the
small modules a rewrite leaves behind. ``convert`` runs a pass on a copy of the model and verifies it.
"""

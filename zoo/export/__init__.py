"""Artifacts: Orbax checkpoints, StableHLO and TF SavedModel exports, and the runners that load any of them."""

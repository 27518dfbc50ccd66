"""Artifacts: Orbax checkpoints (and, later, StableHLO and SavedModel exports)."""

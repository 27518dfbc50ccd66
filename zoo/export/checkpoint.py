"""Moved to ``zoo.checkpoint`` (a checkpoint is not an export); this module re-exports it for one release."""

from zoo.checkpoint import (  # noqa: F401
    CHECKPOINT, CheckpointError, CheckpointRefused, PathKind, PluginStatus, StepRef, check_save_target,
    checkpoint_root, classify_path, content_hash, find_step, json_hash, load, param_layout, plugin_status,
    read_metadata, read_stored, save, steps_text, tree_difference, tree_layout)

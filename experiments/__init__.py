"""The Hydra experiment app and its configs (the main job lives here once the pruner exists)."""

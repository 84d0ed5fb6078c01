"""The experiment suite: the Hydra app (``halp-run``), the main job, its configs, data, training, reports."""

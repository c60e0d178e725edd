"""The distributed grid: Ray Tune over (model, fold, seed), each trial a Ray Train run (platform layer)."""

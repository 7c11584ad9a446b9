"""sauce-export: remove a concept through SAE features, fold it into weights, ship a checkpoint."""

__version__ = "0.1.0"

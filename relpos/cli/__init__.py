"""Console entry points: ``relpos-train``, ``relpos-eval``, ``relpos-plot`` (also
``python -m relpos.cli train|eval|plot``). Each parses its Hydra config and calls the
library; ``relpos-plot`` imports no JAX."""

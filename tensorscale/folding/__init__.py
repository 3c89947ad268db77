"""`down`: fold a model's units (residual dimensions, heads, FFN neurons) into clusters (cluster-fold)."""

"""Learning to rank: feature sets, behaviour aggregates, training and the model registry (later issues)."""

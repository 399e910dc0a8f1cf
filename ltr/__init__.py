"""Layer 3 of 5 (indexing < search < ltr < eval < search.app): feature sets and extraction,
LambdaMART training from judgments or clicks, the model registry, the ltr pipeline stage,
behaviour aggregates, point-in-time rows, drift and online experiments."""

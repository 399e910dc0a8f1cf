"""Layer 2 of 5 (indexing < search < ltr < eval < search.app): retrieval over the backend interface
(embedded, Elasticsearch), candidate generation and fusion, business rules, interleaving, the
ranking pipeline, the event store and input limits. `search.app` is not part of this layer: it
is the composition root on top of everything (config, service, CLI)."""

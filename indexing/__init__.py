"""Layer 1 of 5 (indexing < search < ltr < eval < search.app): corpus readers, text analysis, BM25
and dense indexes, immutable index generations and their build jobs, the Elasticsearch indexer,
engine-home paths and the one SQLite helper. Imports nothing from the other packages."""

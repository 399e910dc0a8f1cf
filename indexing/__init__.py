"""Indexing pipeline: corpus readers, text analysis, BM25 and dense indexes, index bundles and rebuild jobs."""

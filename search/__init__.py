"""Query side: retrievers over an index generation, the command line, and (later) the ranking pipeline and API."""

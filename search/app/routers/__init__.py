"""The HTTP API's routers, one module per group: search, events, documents, operations, admin."""

"""Every input limit of the engine, in one place: the CLI, the HTTP API, the rules and the stores
all check against these, so a query the service accepts is one the event store can log.
"""
from __future__ import annotations

# Queries: BEIR's ArguAna queries are whole arguments, thousands of characters.
MAX_QUERY_CHARS = 16_384
# Names: metadata field names (filters, diversity) and feature names.
MAX_FIELD_NAME_LENGTH = 128
# request_id, event_id, user_id, session_id, model_version, pipeline and index names.
MAX_ID_LENGTH = 128
MAX_DOC_ID_LENGTH = 512
# Pages and windows.
MAX_PAGE_SIZE = 100
DEFAULT_RERANK_WINDOW = 200
MAX_RERANK_WINDOW = 2_000
MAX_RESULTS_PER_REQUEST = 1_000
MAX_FEATURES_PER_RESULT = 512
# Requests.
MAX_BODY_BYTES = 64 * 1024
# Request line + headers the HTTP server buffers (uvicorn's h11 `max_incomplete_event_size`, 16 KiB
# by default). Past it the server answers a bare 400 and closes while the client is still sending,
# which the client sees as a connection reset; below it every oversized URL reaches the app and
# gets its JSON 4xx (a `q` over MAX_QUERY_CHARS: 422).
MAX_REQUEST_HEAD_BYTES = 1024 * 1024
MAX_BATCH_EVENTS = 1_000
MAX_EXCLUDE_IDS = 1_000  # document ids in one exclude list
MAX_FILTERS = 32  # fields per request
MAX_IN_VALUES = 1_000  # values in one `in` list
MAX_STRING_LENGTH = 512  # characters in one string filter value

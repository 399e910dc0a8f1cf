"""Document updates on Elasticsearch: the `_bulk` requests (pure) and the write path against a
recording client (no cluster here; tests/test_elastic_integration.py needs one)."""
from __future__ import annotations

import numpy as np
import pytest

from indexing.corpus import Document
from indexing.elastic import VECTOR_FIELD, ElasticsearchError, ElasticsearchSettings
from indexing.updates import UnknownDocumentError
from search.elastic_backend import UPDATE_REFRESH, update_failures, update_operations, write_documents_elastic


def test_update_operations_index_then_delete_through_the_alias():
    docs = [Document("a", "T", "x", {"k": 1}), Document("b", "", "y")]
    operations = update_operations("ltr-t", docs, [np.array([0.6, 0.8], np.float32), None], ["c"])
    assert operations[0] == {"index": {"_index": "ltr-t", "_id": "a"}}
    assert operations[1]["doc_id"] == "a" and operations[1]["title"] == "T" and operations[1]["text"] == "x"
    assert operations[1][VECTOR_FIELD] == pytest.approx([0.6, 0.8]) and VECTOR_FIELD not in operations[3]
    assert operations[2] == {"index": {"_index": "ltr-t", "_id": "b"}}
    assert operations[4] == {"delete": {"_index": "ltr-t", "_id": "c"}} and len(operations) == 5


def test_update_failures_name_each_failed_item():
    response = {"errors": True, "items": [
        {"index": {"_id": "a", "status": 201, "result": "created"}},
        {"index": {"_id": "b", "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad field"}}},
        {"delete": {"_id": "c", "status": 404, "result": "not_found"}},
    ]}
    assert update_failures(response) == ["index b: bad field", "delete c: not_found"]
    assert update_failures({"errors": False, "items": [{"delete": {"_id": "x", "status": 200}}]}) == []


class RecordingClient:
    def __init__(self, response):
        self.calls = []
        self.response = response

    def bulk(self, **kwargs):
        self.calls.append(kwargs)
        return self.response


class StubBackend:
    """What `write_documents_elastic` reads of an `ElasticsearchBackend`."""

    name = "t"
    has_dense = True

    def __init__(self, client, known):
        self.client = client
        self.settings = ElasticsearchSettings(index_prefix="ltr-")
        self.known = known

        class Encoder:
            def encode(self, texts):
                return np.tile(np.array([1.0, 0.0], np.float32), (len(texts), 1))

        self.encoder = Encoder()

    def documents(self, ids):
        return [{"id": i} if i in self.known else None for i in ids]

    def _call(self, what, request):
        return request()


def test_writes_wait_for_a_refresh_and_refuse_unknown_deletes_before_sending():
    client = RecordingClient({"errors": False, "items": []})
    backend = StubBackend(client, known={"d1"})
    receipt = write_documents_elastic(backend, [Document("n1", "", "new")], ["d1"])
    assert receipt["refresh"] == UPDATE_REFRESH == "wait_for" and receipt["upserted"] == 1 and receipt["deleted"] == 1
    (call,) = client.calls
    assert call["refresh"] == "wait_for"
    assert call["operations"][0] == {"index": {"_index": "ltr-t", "_id": "n1"}}
    assert call["operations"][-1] == {"delete": {"_index": "ltr-t", "_id": "d1"}}
    with pytest.raises(UnknownDocumentError, match="nope"):
        write_documents_elastic(backend, deletes=["nope"])
    assert len(client.calls) == 1  # nothing was sent
    write_documents_elastic(backend, [Document("n2", "", "x")], ["n2"])  # a delete of an id upserted in the batch


def test_a_failed_item_is_an_error_naming_it():
    client = RecordingClient({"errors": True, "items": [{"index": {"_id": "n1", "status": 429,
                                                                   "error": {"reason": "too many requests"}}}]})
    with pytest.raises(ElasticsearchError, match="index n1: too many requests"):
        write_documents_elastic(StubBackend(client, set()), [Document("n1", "", "x")])


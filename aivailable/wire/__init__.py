"""The OpenAI wire format, shared by every side that speaks it.

The node's HTTP front end (`api/`), the workers (`engine/worker.py`), the gossip endpoints
(`gossip/signed.py`) and the failover client (`client.py`) all read and write the same bodies:
- `schemas.py`: the request bodies as strict pydantic models (validation and defaults);
- `responses.py`: response bodies, streamed chunks and server-sent events;
- `errors.py`: OpenAI error bodies, the middleware that turns every failure into one, and the guarded
  request-body reader;
- `resume.py`: continuing a broken stream on another replica and splicing the two into one.

Nothing here imports `api/`, `engine/`, `gossip/`, `files/`, `placement/`, `node.py` or `cluster.py`
(tests/test_import_graph.py checks it).
"""

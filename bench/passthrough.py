"""The floor Jarvis is compared with: a minimal Flask + gevent pass-through of an SSE upstream.

No framing, no heartbeats, no watcher, no cancel, no trace ids, no limits: it copies the upstream's
bytes to the client as they arrive. bench/run.py --floor serves it with the same gunicorn settings.
"""

import os

import requests
from flask import Flask, Response, request

app = Flask(__name__)
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2048))
UPSTREAM = os.environ["PASSTHROUGH_UPSTREAM_URL"]


@app.post("/v1/chat/completions")
def chat_completions():
    upstream = session.post(UPSTREAM + "/chat/completions", data=request.get_data(), stream=True,
                            headers={"Content-Type": "application/json", "Accept-Encoding": "identity"})

    def relay():
        try:
            while True:
                data = upstream.raw.read1(65536)
                if not data:
                    return
                yield data
        finally:
            upstream.close()

    return Response(relay(), content_type="text/event-stream")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}

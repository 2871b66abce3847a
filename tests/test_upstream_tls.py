"""An https:// upstream, live: Jarvis verifies its certificate, streams through TLS, and cancels by
closing the TLS connection."""

import pytest
import requests

from tests.clients import RawClient, chat_body, chat_request, content_of
from tests.fake_upstream import FakeUpstream
from tests.live import sse_events
from tests.tls import make_certificate, server_context

pytestmark = pytest.mark.live


@pytest.fixture
def tls_upstream(tmp_path):
    cert, key = make_certificate(tmp_path)
    server = FakeUpstream(tls=server_context(cert, key))
    server.cert = cert
    yield server
    server.stop()


def test_a_stream_over_tls_arrives_whole_and_a_stop_closes_the_upstream_connection(start_jarvis, tls_upstream):
    jarvis = start_jarvis({"JARVIS_UPSTREAM_CA_FILE": str(tls_upstream.cert)}, upstream_url=tls_upstream.url)
    for _ in range(3):  # one TLS connection, reused
        response = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 5}), stream=True)
        assert content_of(sse_events(response)) == "w0 w1 w2 w3 w4 "
    assert len(tls_upstream.chats) == 3 and tls_upstream.connections == 1

    client = RawClient(jarvis.port)
    client.send(chat_request(chat_body({"tokens": 1000, "interval": 0.02})))
    exchange = tls_upstream.wait_for_exchange(4)
    client.read_until(b'"content": "w2 "')
    client.close_rst()
    tls_upstream.wait_until_ended(exchange, timeout=5)
    assert exchange.closed_at is not None and exchange.tokens_sent < 1000
    jarvis.wait_for_log("outcome=client_stop")
    jarvis.assert_log_clean()


def test_an_upstream_certificate_nobody_configured_to_trust_is_a_clear_502(start_jarvis, tls_upstream):
    jarvis = start_jarvis(upstream_url=tls_upstream.url)  # certifi's public roots only
    response = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 5}))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable" and "not trusted" in error["message"]
    assert not tls_upstream.chats

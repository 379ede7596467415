"""EtcdClient's requests, against a stand-in of etcd's v3 JSON gateway on 127.0.0.1 (the
real etcd is tests/e2e/test_multinode.py's): what it sends, how it reads the answers, and
that it ignores proxy settings."""

import base64
import http.server
import json
import os
import threading

import pytest

from . import load

b4ns = load("bypass4netns.py", "bypass4netns")


def b64(text):
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def gateway():
    """(URL, [(path, body)] received); answers as etcd 3.4's gateway does."""
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, body))
            answers = {
                "/v3/lease/grant": {"ID": "7587862072907337728", "TTL": "15"},
                "/v3/lease/keepalive": {"result": {"ID": "7587862072907337728", "TTL": "15"}},
                "/v3/kv/range": {"kvs": [{"key": b64("bypass4netns/multinode/10.89.71.5:80"),
                                          "value": b64("198.18.0.1:34567")}], "count": "1"},
            }
            data = json.dumps(answers.get(self.path, {})).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1], received
    server.shutdown()
    server.server_close()


def test_requests_and_answers(gateway, monkeypatch):
    url, received = gateway
    monkeypatch.setitem(os.environ, "http_proxy", "http://127.0.0.1:1")  # a proxy that is not there
    etcd = b4ns.EtcdClient(url + "/")
    lease = etcd.grant(15)
    assert lease == 7587862072907337728
    assert etcd.keep_alive(lease)
    etcd.put("bypass4netns/multinode/10.89.71.5:80", "198.18.0.1:34567", lease)
    etcd.delete("bypass4netns/multinode/10.89.71.5:80")
    assert etcd.prefix(b4ns.MULTINODE_PREFIX) == [("bypass4netns/multinode/10.89.71.5:80", "198.18.0.1:34567")]
    etcd.revoke(lease)
    assert received == [
        ("/v3/lease/grant", {"TTL": 15}),
        ("/v3/lease/keepalive", {"ID": lease}),
        ("/v3/kv/put", {"key": b64("bypass4netns/multinode/10.89.71.5:80"), "value": b64("198.18.0.1:34567"),
                        "lease": lease}),
        ("/v3/kv/deleterange", {"key": b64("bypass4netns/multinode/10.89.71.5:80")}),
        ("/v3/kv/range", {"key": b64("bypass4netns/multinode/"), "range_end": b64("bypass4netns/multinode0")}),
        ("/v3/lease/revoke", {"ID": lease}),
    ]

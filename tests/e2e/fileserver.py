"""A file served over HTTP in the test namespace, for a container to fetch.

The http fixtures of the end-to-end tests serve with serve_file(): one
index.txt of a random body, python3 -m http.server in front of it.
"""

import subprocess
import uuid


def serve_file(testbed, server, directory, host, prefix="b4ns-"):
    """(port, body): directory/index.txt, a random body after prefix, served by python3 -m
    http.server on host (an address of the test namespace), started with the `server` fixture."""
    port = testbed.free_port(host)
    body = prefix + uuid.uuid4().hex
    (directory / "index.txt").write_text(body)
    argv = ["python3", "-m", "http.server", "--bind", host, "--directory", str(directory), str(port)]
    server(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testbed.wait_port(host, port)
    return port, body

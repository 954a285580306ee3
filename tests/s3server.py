"""A real S3 API on 127.0.0.1 for tests and figure scripts: moto's server mode (the `dev` extra).

`local_s3()` (a context manager) starts one server on a free loopback port and yields its endpoint
URL; `s3_environ(endpoint)` is the standard environment that points boto3, s3fs and pyarrow at it
(``AWS_ENDPOINT_URL``, test credentials, a region); `make_bucket(name)` creates a bucket there. Jobs,
Ray workers (started after the environment is set) and subprocesses reach the server through that
environment alone, exactly as they would reach AWS.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


def s3_environ(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 for the block; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(name: str, endpoint: str | None = None) -> str:
    """Create bucket `name` on the server of `endpoint` (default: AWS_ENDPOINT_URL); returns s3://name."""
    import boto3

    env = s3_environ(endpoint or os.environ["AWS_ENDPOINT_URL"])
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}"

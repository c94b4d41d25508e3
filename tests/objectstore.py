"""A local S3-compatible server for tests: moto's ``ThreadedMotoServer`` on loopback.

* ``moto_server`` (session): one server on 127.0.0.1, on a port the OS picks, stopped when the
  session ends; its value is the endpoint URL. It starts only when a test asks for it.
* ``s3_bucket`` (function): a fresh, uniquely named, empty bucket; its value is ``s3://NAME``.
  The environment is set (``S3_ENV`` plus the endpoint) so that plain ``fsspec.filesystem("s3")``
  and ``fsspec.open("s3://...")`` reach the server with no arguments, in this process and in
  every process started afterwards (subprocesses, Dask ``processes`` workers, LocalCluster
  workers), which inherit the environment. The bucket and its objects are removed afterwards.

Both skip, with the reason, where s3fs or moto[server] is not installed (the ``s3`` / ``test``
extras). conftest.py imports the two fixtures, so any test module can ask for them.

How the endpoint gets through: s3fs passes ``endpoint_url`` to aiobotocore only when it was
given one, and otherwise botocore resolves it each time a client is created, from
``AWS_ENDPOINT_URL_S3`` (first) or ``AWS_ENDPOINT_URL``, read from ``os.environ`` right then.
So ``AWS_ENDPOINT_URL_S3`` works in this process after fsspec was imported as well as in child
processes. fsspec's own ``FSSPEC_S3_ENDPOINT_URL`` is NOT used: fsspec reads ``FSSPEC_*``
variables once, when ``fsspec.config`` is imported, so setting it in a test reaches child
processes only; and since fsspec passes it as an explicit ``endpoint_url``, a value left in the
developer's environment would win over botocore's, so the fixture removes it (and fsspec's
already loaded ``conf["s3"]``) for the test.

fsspec caches filesystem instances by their arguments, and ``fsspec.filesystem("s3")`` has the
same arguments whatever the environment, so an instance made before the environment changed
(with a client already connected elsewhere) would be handed back: the fixture clears s3fs's
instance cache before and after the test.

A listing cached by one process does not see objects that another process wrote: in the
process that listed, ``ls``, ``info``, ``exists`` and even ``cat``/``open`` of such an object
answer from the stale listing (FileNotFoundError) until ``fs.invalidate_cache()``. ``find``
always asks the server. test_objectstore.py shows this.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"  # the region where CreateBucket needs no LocationConstraint

# Dummy credentials and a region; the endpoint is added per server (AWS_ENDPOINT_URL_S3).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,  # what botocore reads
    "AWS_REGION": REGION,  # what other AWS SDKs and tools read
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service
}

# Settings from the developer's environment that would take the client elsewhere or fail it.
S3_ENV_REMOVED = (
    "AWS_ENDPOINT_URL",  # AWS_ENDPOINT_URL_S3 wins over it anyway
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",  # would make botocore ignore AWS_ENDPOINT_URL_S3
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "FSSPEC_S3",
    "FSSPEC_S3_ENDPOINT_URL",
)


def import_s3() -> tuple[Any, Any]:
    """(s3fs module, moto's ThreadedMotoServer), or skip the test saying what is missing."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"S3 tests need s3fs and moto[server] (the 'test' extra): {exc}")
    return s3fs, ThreadedMotoServer


def s3_environment(endpoint: str, aws_config: Path) -> dict[str, str]:
    """The variables that point a new botocore client at endpoint, with dummy credentials and
    no AWS config or credentials files (aws_config must not exist)."""
    return {
        **S3_ENV,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": str(aws_config),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_config),
    }


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Port 0 makes the OS pick a free port when the server binds, so there is no window between
    choosing a port and using it. All moto servers of one process share moto's in-memory
    backends, so tests keep apart by bucket name (``s3_bucket``), not by server."""
    _, server_class = import_s3()
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # not one log line per request
    server = server_class(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(level)


@pytest.fixture
def s3_bucket(
    moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A new empty bucket on ``moto_server``; yields ``s3://NAME``, with the environment set
    for this test so that any fsspec S3 filesystem made from now on, here or in a process
    started from now on, reaches the server (see the module docstring)."""
    s3fs, _ = import_s3()
    import fsspec.config

    aws_config = tmp_path_factory.mktemp("aws") / "absent"
    for name, value in s3_environment(moto_server, aws_config).items():
        monkeypatch.setenv(name, value)
    for name in S3_ENV_REMOVED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()

    name = f"pytest-{uuid.uuid4().hex}"  # 39 characters: lower case, digits and a hyphen
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    yield f"s3://{name}"

    fs = fsspec.filesystem("s3")  # a new instance if the test cleared the cache
    fs.invalidate_cache()  # objects other processes wrote are then seen, and removed too
    fs.rm(name, recursive=True)  # the objects, then the bucket itself
    s3fs.S3FileSystem.clear_instance_cache()

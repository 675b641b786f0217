"""Shared fixtures: a real SeaweedFS S3 server for the whole session, and stores.

`s3_server` starts `weed mini` once (lazily: only sessions that use S3 pay for it),
exports the standard AWS variables for the session and restores them at the end.
It never skips: a server that cannot start fails the tests with its log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skinlesion.storage import FileStore, S3Store, open_store
from tests import docker_engine, s3server
from tests.obs_servers import mlflow_uri, pushgateway_url  # noqa: F401  (session fixtures)

# Variables that could point boto3 somewhere else than the test server, or read a
# developer's real profile: removed for the session, restored afterwards.
_AWS_ISOLATE = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
)


# `make test` runs two workers (pytest -n 2 --dist loadfile --no-loadscope-reorder). A
# module is one unit of work, so that its fixtures (a trained run, a reference run) are built
# once; the modules that drive the machine's one Docker engine make one unit together.
_DOCKER_MODULES = frozenset({"test_image", "test_pods", "test_docker_kubelet"})
# The longest modules, longest first, are handed out before the rest (file order), so that
# the two workers finish at about the same time.
_LONG_MODULES = ("test_learning", "test_pods", "test_obs_tracking", "test_train")


def _module_rank(item: pytest.Item) -> int:
    module = item.path.stem
    return _LONG_MODULES.index(module) if module in _LONG_MODULES else len(_LONG_MODULES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Any test that (indirectly) uses the S3 server carries the `s3` marker, so that
    `-m "not s3"` really deselects everything that starts SeaweedFS; the long modules come
    first."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
    items.sort(key=_module_rank)  # stable: file order within and after the long ones


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the Docker modules as one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "docker" if Path(path).stem in _DOCKER_MODULES else path

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """SeaweedFS S3 on a free loopback port with credentials; AWS_* set for the session."""
    base: Path = tmp_path_factory.mktemp("seaweedfs")
    try:
        server = s3server.start(base)
    except s3server.S3ServerError as exc:
        pytest.fail(f"cannot start the SeaweedFS S3 test server:\n{exc}", pytrace=False)
    values = {
        **server.env(),
        # No ~/.aws files: only the variables above configure boto3 in tests.
        "AWS_CONFIG_FILE": str(base / "aws-config-none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(base / "aws-credentials-none"),
    }
    try:
        with s3server.environment(values, remove=_AWS_ISOLATE):
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_uri(s3_server: s3server.S3Server) -> str:
    """A fresh, empty `s3://bucket/<unique>` prefix for one test."""
    return f"s3://{s3_server.bucket}/t/{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3_store(s3_uri: str) -> S3Store:
    """An S3Store on a fresh prefix, built the way the code builds it (open_store)."""
    store = open_store(s3_uri)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    """A FileStore on an empty directory of this test."""
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, FileStore)
    return store


# --- the container image (tests/test_image.py, tests/test_pods.py) -------------------------

_BUILT: list[docker_engine.Built] = []


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> docker_engine.Built:
    """`make image` once per session (layer cache kept between sessions). Never skips: a
    machine without a Docker engine fails the tests with what to install."""
    try:
        built = docker_engine.build(tmp_path_factory.mktemp("image"))
    except docker_engine.DockerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    _BUILT.append(built)
    return built


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for built in _BUILT:
        terminalreporter.write_line(
            f"image {built.name}: {built.size_bytes / 1e6:,.0f} MB; "
            f"make image took {built.seconds:.1f} s in this session"
        )

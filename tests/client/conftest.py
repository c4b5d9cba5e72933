"""Fixtures for the client SDK's tests: the service's own end-to-end fixtures (tiny exported
models with their PyTorch originals, real `carousel serve` processes), a fault-injecting
proxy in front of the server, and clients.

The service fixtures are tests/service/conftest.py's, loaded from that file rather than
copied, so both suites test against the same models and servers. (pytest gives each
directory its own instances: a full run starts one tiny server for tests/service and one for
tests/client.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from faultproxy import FaultProxy

_SERVICE_CONFTEST = Path(__file__).resolve().parents[1] / "service" / "conftest.py"
_spec = importlib.util.spec_from_file_location("service_e2e_fixtures", _SERVICE_CONFTEST)
service_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = service_fixtures
_spec.loader.exec_module(service_fixtures)

# The fixtures and the report hook, re-exported for pytest to find here.
tiny_repo = service_fixtures.tiny_repo
tiny = service_fixtures.tiny
start_server = service_fixtures.start_server
server = service_fixtures.server
api_factory = service_fixtures.api_factory
api = service_fixtures.api
check = service_fixtures.check
_dump_server_logs_on_failure = service_fixtures._dump_server_logs_on_failure
pytest_runtest_makereport = service_fixtures.pytest_runtest_makereport

LIMITS = service_fixtures.LIMITS
CYCLE_TEXT = service_fixtures.CYCLE_TEXT
TOL = service_fixtures.TOL


@pytest.fixture
def proxy(server):
    """A fault-injecting TCP proxy in front of the shared tiny server (no faults until a
    test sets its plan); stopped after the test."""
    p = FaultProxy(server.port)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def proxy_for():
    """Factory: a fault-injecting proxy in front of any Server."""
    started: list[FaultProxy] = []

    def make(target) -> FaultProxy:
        p = FaultProxy(target.port)
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()

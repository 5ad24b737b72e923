"""The one line an operator command prints when the broker or the store does not answer
(shared/unreachable.py); the commands themselves are run against closed ports in
tests/integration/test_cli.py."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError
from pymongo.errors import ServerSelectionTimeoutError

from shared.unreachable import BrokerUnreachable, describe

TOPOLOGY_DUMP = ("127.0.0.1:1: [Errno 111] Connection refused (configured timeouts: socketTimeoutMS: 5000.0ms, "
                 "connectTimeoutMS: 5000.0ms), Timeout: 5.0s, Topology Description: <TopologyDescription id: 1,\n"
                 "servers: [<ServerDescription ('127.0.0.1', 1) server_type: Unknown>]>")


@pytest.fixture(autouse=True)
def closed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_MONGO_URL", "mongodb://alliance:pw-s3cret@127.0.0.1:1/?directConnection=true")
    monkeypatch.setenv("ALLIANCE_KAFKA_BOOTSTRAP", "127.0.0.1:2")


def test_an_unanswering_store_is_one_line_naming_its_hosts_and_the_setting_to_check() -> None:
    line = describe(ServerSelectionTimeoutError(TOPOLOGY_DUMP))
    assert line is not None and "\n" not in line
    assert line.startswith("error: MongoDB at 127.0.0.1:1 did not answer within 5 s")
    assert "Connection refused" in line and "ALLIANCE_MONGO_URL" in line and "Topology" not in line


def test_the_stores_password_is_never_printed() -> None:
    line = describe(ServerSelectionTimeoutError("mongodb://alliance:pw-s3cret@127.0.0.1:1 refused"))
    assert line is not None and "pw-s3cret" not in line


def test_an_unanswering_broker_is_one_line_naming_the_bootstrap_and_the_setting_to_check() -> None:
    line = describe(KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 2)]"))
    assert line is not None and "\n" not in line
    assert line.startswith("error: Kafka at 127.0.0.1:2 did not answer") and "ALLIANCE_KAFKA_BOOTSTRAP" in line


def test_an_unreachable_cause_is_found_behind_the_error_raised_from_it() -> None:
    try:
        try:
            raise TimeoutError("no answer")
        except TimeoutError as exc:
            raise BrokerUnreachable("no answer within 5 s") from exc
    except BrokerUnreachable as exc:
        wrapped = RuntimeError("replay failed")
        wrapped.__cause__ = exc
        assert (describe(wrapped) or "").startswith("error: Kafka at 127.0.0.1:2")


def test_any_other_error_keeps_its_traceback() -> None:
    assert describe(ValueError("a bug")) is None
    assert describe(TimeoutError("which one?")) is None

"""Every service has the same shape (issue 13): a `Config` on `shared.settings.ServiceConfig`, a
`build(config)` returning a `shared.http.Service` that owns broker, store client, runtime and HTTP app,
and `create_app` / `asyncapi_app` made from it. Building opens no connection."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import pytest
from faststream import FastStream

from shared.http import Runtime, Service, ServiceApp
from shared.settings import SERVICE_PORTS, ServiceConfig

SERVICES = ("intake", "scoring", "alerts", "reporting")


def config_class(service: str) -> Any:
    module = importlib.import_module(f"services.{service}.app")
    return next(v for k, v in vars(module).items() if k.endswith("Config") and k.lower() == f"{service}config")


@pytest.mark.parametrize("service", SERVICES)
def test_the_config_extends_the_shared_base(service: str) -> None:
    assert issubclass(config_class(service), ServiceConfig)


@pytest.mark.parametrize("service", SERVICES)
def test_build_returns_a_service_owning_broker_store_runtime_and_app(service: str) -> None:
    module = importlib.import_module(f"services.{service}.app")
    built = module.build(config_class(service)())
    assert isinstance(built, Service) and isinstance(built.app, ServiceApp)
    assert built.runtime.name == service and built.runtime.broker is built.broker
    assert built.runtime.mongo is built.mongo


@pytest.mark.parametrize("service", SERVICES)
def test_the_config_reads_the_http_settings_of_its_own_service(service: str) -> None:
    config = config_class(service)()
    assert config.service == service and type(config.http) is SERVICE_PORTS[service]


@pytest.mark.parametrize("service", SERVICES)
def test_the_runtime_monitors_at_the_configured_interval(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_MONITOR_INTERVAL_SECONDS", "2.5")
    built = importlib.import_module(f"services.{service}.app").build(config_class(service)())
    assert built.runtime.monitor_interval_seconds == 2.5


@pytest.mark.parametrize("service", SERVICES)
def test_create_app_and_asyncapi_app_come_from_build(service: str) -> None:
    module = importlib.import_module(f"services.{service}.app")
    assert isinstance(module.create_app(), ServiceApp)
    assert isinstance(module.asyncapi_app(), FastStream)


async def test_the_runtime_runs_store_tasks_and_cancels_them_before_its_stop_steps() -> None:
    events: list[str] = []
    running = asyncio.Event()

    async def job() -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("job cancelled")
            raise

    async def stop() -> None:
        events.append("stop step")

    runtime = Runtime("shape-probe", store_tasks=[job], on_stop=[stop])
    async with runtime.lifespan(ServiceApp("shape-probe")):
        await asyncio.wait_for(running.wait(), timeout=5)
    assert events == ["job cancelled", "stop step"]

"""The whole pipeline, end to end, on the real local broker and store with four service processes:
a submission posted to intake is scored, becomes a trajectory point readable through reporting,
and its deterioration reaches the clinician's webhook, signed so that `standardwebhooks` verifies it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.support.services import Namespace, ServiceProcess
from tests.support.wait import eventually
from tools.receiver import WebhookReceiver
from tools.recorder import TopicRecorder

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _submission(client_id: str, session: int, items: tuple[float, float, float, float]) -> dict[str, Any]:
    r, g, a, o = items
    return {
        "client_id": client_id, "clinician_id": "c-17", "site_id": "north", "instrument": "SRS",
        "session_number": session,
        "administered_at": (datetime.now(UTC) - timedelta(hours=10 - session)).isoformat(),
        "items": {"relationship": r, "goals": g, "approach": a, "overall": o},
    }


async def test_a_deteriorating_submission_flows_to_trajectory_and_signed_webhook(
    services: dict[str, ServiceProcess], keys: dict[str, str], receiver: WebhookReceiver, namespace_m: Namespace,
    artifacts: Path,
) -> None:
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    async with httpx.AsyncClient(timeout=15) as http:
        secret = (await http.post(f"{services['alerts'].url}/v1/webhook-secret", headers=admin)).json()["secret"]
        put = await http.put(f"{services['alerts'].url}/v1/clinicians/c-17", headers=admin, json={
            "site_id": "north", "email": "c17@clinic.example", "webhook_url": receiver.url})
        assert put.status_code in (200, 201), put.text

        submit = {"Authorization": f"Bearer {keys['submit']}"}
        first = await http.post(f"{services['intake'].url}/v1/submissions", headers=submit,
                                json=_submission("client-e2e", 1, (9.5, 9.5, 9.5, 9.5)))
        assert first.status_code == 202, first.text
        second = await http.post(f"{services['intake'].url}/v1/submissions", headers=submit,
                                 json=_submission("client-e2e", 2, (8.0, 7.5, 8.0, 8.0)))
        assert second.status_code == 202, second.text
        falling_id = second.json()["submission_id"]

        read = {"Authorization": f"Bearer {keys['read']}"}

        async def trajectory() -> dict[str, Any] | None:
            r = await http.get(f"{services['reporting'].url}/v1/clients/client-e2e/trajectory",
                               params={"instrument": "SRS"}, headers=read)
            doc: dict[str, Any] = r.json() if r.status_code == 200 else {}
            return doc if len(doc.get("sessions", [])) == 2 else None

        traj = await eventually(trajectory, timeout=60)
        assert [s["total"] for s in traj["sessions"]] == [38.0, 31.5]
        assert traj["latest_total"] == 31.5
        assert traj["at_risk"] is True

    deliveries = await eventually(lambda: _async(receiver.successes()), timeout=60)
    assert len(deliveries) == 1
    got = deliveries[0]
    payload = Webhook(secret).verify(got.body, {k: v for k, v in got.headers.items() if k.startswith("webhook-")})
    assert payload["submission_id"] == falling_id
    assert set(payload["triggers"]) >= {"below_cutoff", "drop_from_previous"}
    assert got.headers["x-alliance-event"] == "alliance.deterioration.v1"
    (artifacts / "e2e-webhook.json").write_text(json.dumps(payload, indent=2))

    async with TopicRecorder(namespace_m.stack.bootstrap, namespace_m.kafka().topics().scored) as scored:
        await scored.until(lambda records: falling_id in {json.loads(r.value)["submission_id"] for r in records})


async def test_service_logs_are_json_with_correlation_ids_and_no_client_ids(
        services: dict[str, ServiceProcess]) -> None:
    for proc in services.values():
        lines = proc.log_path.read_text().splitlines()
        assert lines, f"{proc.name} logged nothing"
        docs = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"ts", "level", "service", "msg"} <= d.keys() for d in docs)
        assert "client-e2e" not in proc.log_path.read_text(), f"{proc.name} logged a client id"
    intake_log = services["intake"].log_path.read_text()
    assert '"correlation_id"' in intake_log


async def _async(value: Any) -> Any:
    return value

"""The Node.js example of docs/partners.md verifies real webhook deliveries (issue 14).

The example is taken from the document itself, so the two cannot drift apart, and run by Node with
the npm package `standardwebhooks` that tests/node/package.json pins (installed by scripts/bootstrap
with `npm ci`). Each delivery is signed by the alerts service's own signing code, as the delivery
worker signs it.
"""

from __future__ import annotations

import json
import re
import time
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest

from services.alerts import signing
from shared.topics import DETERIORATION
from tests.support.node import run_node

ROOT = Path(__file__).resolve().parents[2]
BODY = (ROOT / "tests" / "fixtures" / "events" / "v1" / "AllianceDeterioration.current.json").read_bytes()

# Runs the example's `handle` over the requests given on stdin; the last line printed is its answers.
HARNESS = """
const requests = JSON.parse(require("fs").readFileSync(0, "utf8"));
const answers = requests.map((r) => handle(Buffer.from(r.body, "base64"), r.headers));
console.log(JSON.stringify(answers));
"""


def node_example() -> str:
    text = (ROOT / "docs" / "partners.md").read_text()
    section = re.search(r"^### Verifying the signature\n(.*?)(?=^#+ )", text, flags=re.S | re.M)
    assert section is not None, "partners.md has no section 'Verifying the signature'"
    (code,) = re.findall(r"```javascript\n(.*?)```", section.group(1), flags=re.S)
    return code


def delivery(secrets: list[str], body: bytes = BODY, delivery_id: str = "d-1",
             at: int | None = None) -> dict[str, Any]:
    """One webhook request as alerts sends it: its body and the headers signing gives it."""
    headers = signing.webhook_headers(delivery_id, at or int(time.time()), body, secrets, DETERIORATION)
    return {"body": b64encode(body).decode(), "headers": headers}


def run(secret: str, requests: list[dict[str, Any]], tmp_path: Path) -> tuple[list[int], str]:
    """What the example answers to `requests` (in one process, so it remembers what it handled),
    and what it printed before."""
    script = tmp_path / "partner_example.js"
    script.write_text(node_example() + HARNESS)
    out = run_node(script, stdin=json.dumps(requests), env={"WEBHOOK_SECRET": secret})
    *printed, answers = out.splitlines()
    return json.loads(answers), "\n".join(printed)


@pytest.fixture
def secret() -> str:
    return signing.new_secret()


def test_the_example_accepts_a_delivery_signed_by_alerts(secret: str, tmp_path: Path) -> None:
    answers, printed = run(secret, [delivery([secret])], tmp_path)
    assert answers == [200]
    assert json.loads(BODY)["alert_id"] in printed


def test_the_example_rejects_a_tampered_body(secret: str, tmp_path: Path) -> None:
    signed = delivery([secret])
    tampered = {**signed, "body": b64encode(BODY.replace(b'"critical"', b'"warning"')).decode()}
    assert BODY.count(b'"critical"') == 1
    assert run(secret, [tampered], tmp_path)[0] == [401]


def test_the_example_rejects_a_delivery_signed_with_another_secret(secret: str, tmp_path: Path) -> None:
    assert run(secret, [delivery([signing.new_secret()])], tmp_path)[0] == [401]


def test_the_example_rejects_a_replayed_old_delivery(secret: str, tmp_path: Path) -> None:
    assert run(secret, [delivery([secret], at=int(time.time()) - 3600)], tmp_path)[0] == [401]


def test_the_example_accepts_either_secret_during_a_rotation(secret: str, tmp_path: Path) -> None:
    assert run(secret, [delivery([signing.new_secret(), secret])], tmp_path)[0] == [200]


def test_the_example_handles_a_retried_delivery_once(secret: str, tmp_path: Path) -> None:
    answers, printed = run(secret, [delivery([secret], delivery_id="d-retried")] * 3, tmp_path)
    assert answers == [200, 200, 200]
    assert printed.count("alert ") == 1

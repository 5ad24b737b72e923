"""Node.js for the tests that run partner-facing JavaScript or JavaScript validators.

The npm packages are those tests/node/package-lock.json pins; `scripts/bootstrap` installs them
(`npm ci`) and `scripts/system-deps` installs Node itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE_MODULES = NODE_DIR / "node_modules"


def run_node(script: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> str:
    """What `node script args...` prints; fails the test when it exits non-zero. CommonJS `require`
    finds the packages from anywhere (NODE_PATH); an ES module must live in tests/node to import them."""
    node = shutil.which("node")
    assert node is not None, "Node.js is not installed (scripts/system-deps installs it)"
    assert NODE_MODULES.is_dir(), "the npm packages of tests/node are not installed: run scripts/bootstrap"
    done = subprocess.run([node, str(script), *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "NODE_PATH": str(NODE_MODULES), **(env or {})},
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout

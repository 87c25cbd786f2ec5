"""The lab's state: its name, the directory it keeps everything in, and what it knows of itself.

STATE_DIR holds the lab's record of itself (lab.json, read back as LabInfo), its secrets (in
root-only files from before they hold anything) and what Pulumi's state would keep between
runs. `sh` is the checked command every part of the lab runs.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.tools.rehearsal import generated_state, restore_generated

# One lab per name: MAILROOM_LAB_NAME gives a second lab its own namespaces, state and cgroup,
# so two can run side by side (the addresses repeat, but each pair of namespaces is its own net).
NAME = os.environ.get("MAILROOM_LAB_NAME", "mrlab")
STATE_DIR = Path(os.environ.get("MAILROOM_LAB_STATE", f"/var/lib/mailroom-lab/{'run' if NAME == 'mrlab' else NAME}"))


class LabError(RuntimeError):
    pass


@dataclass
class LabInfo:
    stack: str
    overrides: dict[str, Any]
    host: str
    admin_user: str
    key_file: str
    passwords: dict[str, str]
    ses_user: str
    ses_spool: str
    dns: str
    zone: str
    steps: list[dict[str, Any]]

    def save(self) -> None:
        secret_file("lab.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> LabInfo:
        return cls(**json.loads((STATE_DIR / "lab.json").read_text()))


def sh(*argv: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}: exit {result.returncode}: {result.stderr.strip()[-800:]}")
    return result


def secret_file(name: str, value: str) -> Path:
    """STATE_DIR/NAME holding VALUE, readable by root only from before it holds anything."""
    path = STATE_DIR / name
    path.write_text("")
    path.chmod(0o600)
    path.write_text(value)
    return path


def keep_state() -> None:
    """What Pulumi's state would keep between runs: the keys and passwords the mocks generated."""
    secret_file("pulumi-state.json", json.dumps(generated_state()))


def restore_state() -> None:
    state = STATE_DIR / "pulumi-state.json"
    restore_generated(json.loads(state.read_text()) if state.exists() else [])

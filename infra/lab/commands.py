"""Remote commands against the lab host, run the way Pulumi's `command.remote.Command` runs them.

The provider opens an SSH session as the connection's user with its private key, sends the
`create` string as the session's command (the user's login shell runs it: `$SHELL -c CREATE`),
writes `stdin` to the session and closes it, and records exit code, stdout and stderr. OpenSSH's
client does the same with `ssh USER@HOST CREATE`, stdin piped. The commands run in order; the
first failure stops the sequence, as a failed resource stops `pulumi up` for its dependants.

stdin carries secrets (the bundle, passwords): it is never printed, logged or kept.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class LabCommand:
    """One remote command: what `command.remote.Command(create=..., stdin=...)` declares."""

    name: str
    create: str
    stdin: str | None = None

    def __repr__(self) -> str:
        shown = "None" if self.stdin is None else f"<{len(self.stdin)} characters, not shown>"
        return f"LabCommand(name={self.name!r}, create={self.create!r}, stdin={shown})"


@dataclass(frozen=True)
class CommandResult:
    name: str
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Connection:
    """What `command.remote.Command(connection=...)` holds, plus the namespace to dial from."""

    host: str
    user: str
    private_key: Path
    netns: str  # the lab's world namespace: the administrator is outside the host, as in the cloud
    port: int = 22

    def ssh_argv(self, command: str, *options: str) -> list[str]:
        return [
            "ip", "netns", "exec", self.netns,
            "ssh", "-i", str(self.private_key), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            # Each lab host is new, with new host keys: like the provider, trust on first use.
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10",
            *options,
            f"{self.user}@{self.host}", command,
        ]  # fmt: skip


def run_command(connection: Connection, command: LabCommand, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> CommandResult:
    started = time.monotonic()
    try:
        result = subprocess.run(
            connection.ssh_argv(command.create),
            # No stdin means an empty one, not the caller's terminal (the provider sends nothing).
            input=command.stdin or "",
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        exit_code, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as expired:
        exit_code = 124
        stdout = _text(expired.stdout)
        stderr = _text(expired.stderr) + f"\n(lab: {command.name} timed out after {timeout:.0f} s)"
    return CommandResult(command.name, exit_code, stdout, stderr, round(time.monotonic() - started, 2))


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def run_commands(
    connection: Connection, commands: Iterable[LabCommand], timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> list[CommandResult]:
    """Run COMMANDS in order; the list ends with the first failure (check `results[-1].ok`)."""
    results = []
    for command in commands:
        result = run_command(connection, command, timeout)
        results.append(result)
        if not result.ok:
            break
    return results

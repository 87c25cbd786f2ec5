"""The lab: the droplet rehearsed on this machine.

`infra.lab.machinery` boots a Debian 12 host from a stack's rendered user-data, with the outside
world (DNS, SES, ACME, another domain's mail server) stood in for in network namespaces;
`infra.lab.commands` runs remote commands on it as Pulumi's command provider would.
`infra.lab.control` drives the Pulumi program (under mocks) through a lab.
"""

from infra.lab.commands import CommandResult, Connection, LabCommand, run_commands
from infra.lab.machinery import LabError, LabInfo, LabStatus, down, status, up

__all__ = [
    "CommandResult",
    "Connection",
    "LabCommand",
    "LabError",
    "LabInfo",
    "LabStatus",
    "down",
    "run_commands",
    "status",
    "up",
]

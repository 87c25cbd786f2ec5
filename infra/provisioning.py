"""Provisioning: the remote commands that converge the server after the droplet exists.

Four steps, each a `command.remote.Command` over SSH as the admin user with mailroom's deploy
key: wait until cloud-init's bootstrap finished; install the apply script; send the bundle to
it; obtain the Let's Encrypt certificate. Secrets travel only inside the bundle, on the stdin
of the apply step, whose output is kept secret and unlogged. A step re-runs only when what it
carries changes (its triggers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command

from infra.bundle import Bundle

APPLY_SCRIPT = Path(__file__).resolve().parent.parent / "cloud_init" / "apply.py"
APPLY_PATH = "/usr/local/lib/mailroom/apply.py"
BOOTSTRAP_MARKER = "/var/lib/mailroom-bootstrapped"

# cloud-init exits 2 when it finished with recoverable warnings; the marker written by the last
# runcmd of the user-data is what says the bootstrap completed.
WAIT_FOR_BOOTSTRAP = f"""set -eu
cloud-init status --wait >/dev/null 2>&1 || true
if [ ! -e {BOOTSTRAP_MARKER} ]; then
  echo "the cloud-init bootstrap did not finish; see /var/log/cloud-init-output.log" >&2
  exit 1
fi
echo "bootstrap finished"
"""
INSTALL_APPLY_SCRIPT = f"sudo install -D -m 0755 -o root -g root /dev/stdin {APPLY_PATH}"
RUN_APPLY = f"sudo /usr/bin/python3 {APPLY_PATH}"
# After the bundle (which holds certbot's token and installs a self-signed certificate):
# Let's Encrypt's certificate over DNS-01; certbot's own timer renews it.
ISSUE_CERTIFICATE = "sudo /usr/local/sbin/mailroom-certificate --issue"


@dataclass(frozen=True)
class Step:
    """One remote command as plain data: what the program declares and what the lab runs."""

    name: str
    create: str
    stdin_is_secret: bool = False


STEPS = (
    Step("wait-for-bootstrap", WAIT_FOR_BOOTSTRAP),
    Step("install-apply-script", INSTALL_APPLY_SCRIPT),
    Step("apply-bundle", RUN_APPLY, stdin_is_secret=True),
    Step("issue-certificate", ISSUE_CERTIFICATE),
)


def apply_script() -> str:
    return APPLY_SCRIPT.read_text()


def script_digest() -> str:
    return hashlib.sha256(apply_script().encode()).hexdigest()


class Provisioning(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        *,
        host: pulumi.Input[str],
        user: str,
        private_key: pulumi.Output[str],
        server_id: pulumi.Output[str],
        bundle: pulumi.Output[Bundle],
        certificate_names: list[str],
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mailroom:index:Provisioning", name, None, opts)
        connection = command.remote.ConnectionArgs(
            host=host,
            user=user,
            private_key=private_key,
            # A new droplet takes a minute or two before sshd answers: keep dialling.
            dial_error_limit=60,
            per_dial_timeout=10,
        )
        wait, install, apply, issue = STEPS
        # Re-run on a new droplet only: bootstrap happens once per machine.
        waited = command.remote.Command(
            f"{name}-{wait.name}",
            connection=connection,
            create=wait.create,
            triggers=[server_id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on),
        )
        installed = command.remote.Command(
            f"{name}-{install.name}",
            connection=connection,
            create=install.create,
            stdin=apply_script(),
            triggers=[server_id, script_digest()],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[waited]),
        )
        secret_bundle: pulumi.Output[Bundle] = pulumi.Output.secret(bundle)
        bundle_json = secret_bundle.apply(lambda b: b.to_json())
        bundle_digest = secret_bundle.apply(lambda b: b.digest())
        self.applied = command.remote.Command(
            f"{name}-{apply.name}",
            connection=connection,
            create=apply.create,
            # The bundle holds every secret the server needs: stdin only, never a command line.
            stdin=bundle_json,
            triggers=[server_id, script_digest(), bundle_digest],
            logging=command.remote.Logging.NONE,
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[installed], additional_secret_outputs=["stdout", "stderr"]
            ),
        )
        command.remote.Command(
            f"{name}-{issue.name}",
            connection=connection,
            create=issue.create,
            # Once per server and set of names; the script itself skips an existing certificate.
            triggers=[server_id, *certificate_names],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.applied]),
        )
        self.register_outputs({})

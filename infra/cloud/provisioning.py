"""Provisioning: the remote steps (infra.core.steps) declared as `command.remote.Command`s.

Secrets travel only inside the bundle, on the stdin of the apply step, whose output is kept
secret and unlogged. A step re-runs only when what it carries changes (its triggers).
"""

from __future__ import annotations

import pulumi
import pulumi_command as command

from infra.core.bundle import Bundle
from infra.core.steps import APPLY, INSTALL, ISSUE, WAIT, apply_script, script_digest


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
        # Re-run on a new droplet only: bootstrap happens once per machine.
        waited = command.remote.Command(
            f"{name}-{WAIT.name}",
            connection=connection,
            create=WAIT.create,
            triggers=[server_id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on),
        )
        installed = command.remote.Command(
            f"{name}-{INSTALL.name}",
            connection=connection,
            create=INSTALL.create,
            stdin=apply_script(),
            triggers=[server_id, script_digest()],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[waited]),
        )
        secret_bundle: pulumi.Output[Bundle] = pulumi.Output.secret(bundle)
        bundle_json = secret_bundle.apply(lambda b: b.to_json())
        bundle_digest = secret_bundle.apply(lambda b: b.digest())
        self.applied = command.remote.Command(
            f"{name}-{APPLY.name}",
            connection=connection,
            create=APPLY.create,
            # The bundle holds every secret the server needs: stdin only, never a command line.
            stdin=bundle_json,
            triggers=[server_id, script_digest(), bundle_digest],
            logging=command.remote.Logging.NONE,
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[installed], additional_secret_outputs=["stdout", "stderr"]
            ),
        )
        command.remote.Command(
            f"{name}-{ISSUE.name}",
            connection=connection,
            create=ISSUE.create,
            # Once per server and set of names; the script itself skips an existing certificate.
            triggers=[server_id, *certificate_names],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.applied]),
        )
        self.register_outputs({})

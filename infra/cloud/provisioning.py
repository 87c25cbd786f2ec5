"""Provisioning: the remote steps (infra.core.steps) declared as `command.remote.Command`s.

Secrets travel only inside the bundle, on the stdin of the apply step, whose output is kept
secret and unlogged. A step re-runs only when what it carries changes (its triggers).

None gets the previous run's output in its environment (`add_previous_output_in_env`, on by
default, sends it with SSH's Setenv, which sshd refuses by default, with a warning on every
run; and the apply step's output is secret).
"""

from __future__ import annotations

import pulumi
import pulumi_command as command

from infra.core.bundle import Bundle
from infra.core.steps import APPLY, INSTALL, ISSUE, VOLUME, WAIT, Step, apply_script, script_digest


class Provisioning(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        *,
        host: pulumi.Input[str],
        user: str,
        private_key: pulumi.Output[str],
        server_id: pulumi.Output[str],
        volume_attachment_id: pulumi.Output[str],
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

        def step(
            step: Step,
            triggers: list[pulumi.Input[str]],
            after: list[pulumi.Resource],
            stdin: pulumi.Input[str] | None = None,
            secret_output: bool = False,
        ) -> command.remote.Command:
            return command.remote.Command(
                f"{name}-{step.name}",
                connection=connection,
                create=step.create,
                delete=step.delete,
                stdin=stdin,
                add_previous_output_in_env=False,
                logging=command.remote.Logging.NONE if secret_output else None,
                triggers=triggers,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    depends_on=after,
                    additional_secret_outputs=["stdout", "stderr"] if secret_output else None,
                ),
            )

        # Re-run on a new droplet only: bootstrap happens once per machine.
        waited = step(WAIT, [server_id], depends_on)
        # Replaced with the attachment (its id among the triggers), and so deleted before it: the
        # old attachment's delete-before-replace takes its dependents first, and this one's
        # delete stops mail and unmounts the volume on the droplet the volume leaves.
        mounted = step(VOLUME, [server_id, volume_attachment_id], [waited])
        installed = step(INSTALL, [server_id, script_digest()], [mounted], stdin=apply_script())
        secret_bundle: pulumi.Output[Bundle] = pulumi.Output.secret(bundle)
        bundle_json = secret_bundle.apply(lambda b: b.to_json())
        bundle_digest = secret_bundle.apply(lambda b: b.digest())
        self.applied = step(
            APPLY,
            [server_id, script_digest(), bundle_digest],
            [installed],
            # The bundle holds every secret the server needs: stdin only, never a command line.
            stdin=bundle_json,
            secret_output=True,
        )
        # Once per server and set of names; the script itself skips an existing certificate.
        step(ISSUE, [server_id, *certificate_names], [self.applied])
        self.register_outputs({})

"""MailHost: the DigitalOcean side — droplet, mail volume, cloud firewall, monitoring alerts.

What DigitalOcean's API refuses, and how this component keeps clear of it:

- An SSH key already on the account is refused (422 "SSH Key is already in use on your
  account"), and the admins' keys usually are (uploaded by hand, or by another stack). Only the
  stack's own deploy key, generated for it and so unique, is registered; the admins' keys reach
  the server through the user-data.
- Monitoring alerts go only to addresses verified on the account (400 "email is not verified"):
  by default the account's own address, which is.
- A volume is attached to one droplet at a time: the attachment is deleted before its
  replacement is created, after the provisioning's volume step stopped mail on the old droplet.
- Tags are account-wide: each host has its own, so destroying one stack leaves another's be.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

from infra.cloud.relay import bounded_name
from infra.core.facts import (
    HTTP_PORT,
    HTTPS_PORT,
    IMAPS_PORT,
    MANAGESIEVE_PORT,
    SMTP_PORT,
    SSH_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
)
from infra.core.settings import BackupPlan, Settings

# DigitalOcean's API: a tag name is at most 255 characters.
TAG_NAME_LIMIT = 255

# Ports the world may reach: SMTP, submissions (implicit TLS), submission, IMAPS, ManageSieve,
# HTTP (ACME and redirects) and HTTPS (MTA-STS, autoconfig, webmail).
PUBLIC_TCP_PORTS = (SMTP_PORT, SUBMISSIONS_PORT, SUBMISSION_PORT, IMAPS_PORT, MANAGESIEVE_PORT, HTTP_PORT, HTTPS_PORT)
ANYWHERE = ("0.0.0.0/0", "::/0")

# DigitalOcean's backup windows: a weekly backup starts on this day, any backup in the four hours
# from this hour (UTC; the API accepts 0, 4, 8, 12, 16 and 20).
BACKUP_WEEKDAY = "SUN"
BACKUP_HOUR = 4

# Monitoring alerts: (metric type, threshold in percent, description).
ALERTS = (
    ("v1/insights/droplet/cpu", 90, "CPU above 90% for 10 minutes"),
    ("v1/insights/droplet/memory_utilization_percent", 90, "memory above 90% for 10 minutes"),
    ("v1/insights/droplet/disk_utilization_percent", 85, "root disk above 85% for 10 minutes"),
)


@dataclass(frozen=True)
class HostArgs:
    """What the DigitalOcean side needs to know of the settings."""

    host_name: str
    domain: str
    region: str
    droplet_size: str
    image: str
    backups: bool
    backup_plan: BackupPlan
    volume_name: str
    volume_size_gb: int
    admin_cidrs: tuple[str, ...]
    do_alert_email: str  # empty: the DigitalOcean account's own (verified) address

    @classmethod
    def of(cls, settings: Settings) -> HostArgs:
        return cls(
            host_name=settings.host_name,
            domain=settings.domain,
            region=settings.region,
            droplet_size=settings.droplet_size,
            image=settings.image.value,
            backups=settings.backups,
            backup_plan=settings.backup_plan,
            volume_name=settings.volume_name,
            volume_size_gb=settings.volume_size_gb,
            admin_cidrs=tuple(settings.admin_cidrs),
            do_alert_email=settings.do_alert_email,
        )

    @property
    def tag(self) -> str:
        """This host's DigitalOcean tag (letters, digits, dashes: what the API accepts; at most
        255 characters, a long host name shortened with a hash)."""
        return bounded_name("mailroom-", self.host_name, TAG_NAME_LIMIT)


def backup_policy(args: HostArgs) -> do.DropletBackupPolicyArgs | None:
    """The plan Pulumi.yaml promises; without one, DigitalOcean would back up daily (+30 %)."""
    if not args.backups:
        return None
    weekly = args.backup_plan is BackupPlan.WEEKLY
    return do.DropletBackupPolicyArgs(
        plan=args.backup_plan.value, weekday=BACKUP_WEEKDAY if weekly else None, hour=BACKUP_HOUR
    )


def inbound_rules(args: HostArgs) -> list[do.FirewallInboundRuleArgs]:
    rules = [
        do.FirewallInboundRuleArgs(protocol="tcp", port_range=str(SSH_PORT), source_addresses=list(args.admin_cidrs))
    ]
    rules += [
        do.FirewallInboundRuleArgs(protocol="tcp", port_range=str(port), source_addresses=list(ANYWHERE))
        for port in PUBLIC_TCP_PORTS
    ]
    rules.append(do.FirewallInboundRuleArgs(protocol="icmp", source_addresses=list(ANYWHERE)))
    return rules


def outbound_rules() -> list[do.FirewallOutboundRuleArgs]:
    return [
        do.FirewallOutboundRuleArgs(protocol=protocol, port_range="1-65535", destination_addresses=list(ANYWHERE))
        for protocol in ("tcp", "udp")
    ] + [do.FirewallOutboundRuleArgs(protocol="icmp", destination_addresses=list(ANYWHERE))]


class MailHost(pulumi.ComponentResource):
    droplet: do.Droplet
    volume: do.Volume
    attachment: do.VolumeAttachment
    ipv4: pulumi.Output[str]
    ipv6: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        args: HostArgs,
        user_data: pulumi.Input[str],
        deploy_public_key: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mailroom:index:MailHost", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tag = do.Tag(f"{name}-tag", name=args.tag, opts=child)
        # The stack's own key, unique to it (see the module's docstring for the admins' keys).
        deploy_key = do.SshKey(
            f"{name}-deploy-key",
            name=f"mailroom deploy key of {args.host_name}",
            public_key=deploy_public_key,
            opts=child,
        )

        # The mail lives here, not on the droplet: protected from `pulumi destroy` and kept by
        # DigitalOcean if Pulumi ever deletes it, so replacing the droplet loses no mail.
        self.volume = do.Volume(
            f"{name}-mail",
            name=args.volume_name,
            region=args.region,
            size=args.volume_size_gb,
            description=f"mail of {args.domain} (mailroom)",
            tags=[tag.name],
            opts=pulumi.ResourceOptions(parent=self, protect=True, retain_on_delete=True),
        )

        # Named by the FQDN so DigitalOcean sets the reverse DNS (PTR) to it. User-data, image
        # and keys only matter at first boot: changing them later must not replace a running
        # mail server, so they are ignored and the remote commands converge the server instead.
        self.droplet = do.Droplet(
            f"{name}-droplet",
            name=args.host_name,
            region=args.region,
            size=args.droplet_size,
            image=args.image,
            ipv6=True,
            monitoring=True,
            backups=args.backups,
            backup_policy=backup_policy(args),
            ssh_keys=[deploy_key.fingerprint],
            user_data=user_data,
            tags=[tag.name],
            # A clean shutdown lets Postfix and Dovecot close their queues and indexes.
            graceful_shutdown=True,
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["user_data", "image", "ssh_keys"]),
        )
        self.attachment = do.VolumeAttachment(
            f"{name}-mail-attachment",
            droplet_id=self.droplet.id.apply(int),
            volume_id=self.volume.id,
            # One droplet per volume: the old attachment goes first (see the module's docstring).
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        do.Firewall(
            f"{name}-firewall",
            name=f"mailroom-{args.host_name.replace('.', '-')}",
            droplet_ids=[self.droplet.id.apply(int)],
            inbound_rules=inbound_rules(args),
            outbound_rules=outbound_rules(),
            opts=child,
        )
        alert_email: pulumi.Input[str] = (
            args.do_alert_email or do.get_account_output(opts=pulumi.InvokeOutputOptions(parent=self)).email
        )
        for metric, threshold, description in ALERTS:
            do.MonitorAlert(
                f"{name}-alert-{metric.rsplit('/', 1)[-1]}",
                type=metric,
                compare="GreaterThan",
                value=threshold,
                window="10m",
                enabled=True,
                entities=[self.droplet.id],
                description=f"{args.host_name}: {description}",
                alerts=do.MonitorAlertAlertsArgs(emails=[alert_email]),
                opts=child,
            )

        self.ipv4 = self.droplet.ipv4_address
        self.ipv6 = self.droplet.ipv6_address
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "dropletId": self.droplet.id})

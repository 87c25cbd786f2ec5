"""MailHost: the DigitalOcean side — droplet, mail volume, cloud firewall, monitoring alerts."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

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
from infra.core.settings import Settings

# Ports the world may reach: SMTP, submissions (implicit TLS), submission, IMAPS, ManageSieve,
# HTTP (ACME and redirects) and HTTPS (MTA-STS, autoconfig, webmail).
PUBLIC_TCP_PORTS = (SMTP_PORT, SUBMISSIONS_PORT, SUBMISSION_PORT, IMAPS_PORT, MANAGESIEVE_PORT, HTTP_PORT, HTTPS_PORT)
ANYWHERE = ("0.0.0.0/0", "::/0")

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
    volume_name: str
    volume_size_gb: int
    admin_cidrs: tuple[str, ...]
    ssh_public_keys: tuple[str, ...]
    alert_email: str

    @classmethod
    def of(cls, settings: Settings) -> HostArgs:
        return cls(
            host_name=settings.host_name,
            domain=settings.domain,
            region=settings.region,
            droplet_size=settings.droplet_size,
            image=settings.image.value,
            backups=settings.backups,
            volume_name=settings.volume_name,
            volume_size_gb=settings.volume_size_gb,
            admin_cidrs=tuple(settings.admin_cidrs),
            ssh_public_keys=tuple(settings.ssh_public_keys),
            alert_email=settings.alert_email,
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
    ipv4: pulumi.Output[str]
    ipv6: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        args: HostArgs,
        user_data: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mailroom:index:MailHost", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tag = do.Tag(f"{name}-tag", name="mailroom", opts=child)

        keys = [
            do.SshKey(f"{name}-ssh-{i}", name=f"{args.host_name}-{i}", public_key=key, opts=child)
            for i, key in enumerate(args.ssh_public_keys)
        ]

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
            ssh_keys=[k.fingerprint for k in keys],
            user_data=user_data,
            tags=[tag.name],
            # A clean shutdown lets Postfix and Dovecot close their queues and indexes.
            graceful_shutdown=True,
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["user_data", "image", "ssh_keys"]),
        )
        do.VolumeAttachment(
            f"{name}-mail-attachment",
            droplet_id=self.droplet.id.apply(int),
            volume_id=self.volume.id,
            opts=child,
        )
        do.Firewall(
            f"{name}-firewall",
            name=f"mailroom-{args.host_name.replace('.', '-')}",
            droplet_ids=[self.droplet.id.apply(int)],
            inbound_rules=inbound_rules(args),
            outbound_rules=outbound_rules(),
            opts=child,
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
                alerts=do.MonitorAlertAlertsArgs(emails=[args.alert_email]),
                opts=child,
            )

        self.ipv4 = self.droplet.ipv4_address
        self.ipv6 = self.droplet.ipv6_address
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "dropletId": self.droplet.id})

"""MailZone: the Cloudflare side — every record of infra.core.dns, and certbot's DNS token."""

from __future__ import annotations

import json
import operator

import pulumi
import pulumi_cloudflare as cloudflare

from infra.core.dns import Facts, Record, records
from infra.core.settings import Settings

COMMENT = "managed by mailroom (Pulumi)"
DNS_WRITE = "DNS Write"


def record_content(record: Record) -> str | None:
    """Cloudflare's content field: TXT quoted and split at 255; SRV and CAA use data instead."""
    if record.type in ("SRV", "CAA"):
        return None
    return record.rdata() if record.type == "TXT" else record.value


def record_data(record: Record) -> dict[str, str | int | None] | None:
    if record.type == "SRV":
        return {"priority": record.priority, "weight": record.weight, "port": record.port, "target": record.value}
    if record.type == "CAA":
        return {"flags": record.flags, "tag": record.tag, "value": record.value}
    return None


class ZoneNotFoundError(LookupError):
    """The domain's zone is not on the Cloudflare account the token reaches."""


def known_zone(domain: str, zone_id: str | None) -> str:
    """The zone id Cloudflare answered for the domain, or a clear error: never an empty id."""
    if not zone_id:
        raise ZoneNotFoundError(
            f"Cloudflare has no zone {domain} on the account this token reaches: add the domain to "
            "Cloudflare (Websites > Add a site) and give the token Zone:Read on it, then run again"
        )
    return zone_id


def token_addresses(facts: Facts) -> list[str]:
    """The networks certbot's token may be used from: the droplet's two addresses."""
    return [f"{facts.ipv4}/32", f"{facts.ipv6}/128"]


def token_policy_resources(zone_id: str) -> str:
    """The token may act on this zone and nothing else."""
    return json.dumps({f"com.cloudflare.api.account.zone.{zone_id}": "*"})


class MailZone(pulumi.ComponentResource):
    zone_id: pulumi.Output[str]
    name_servers: pulumi.Output[list[str]]
    certbot_token: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        settings: Settings,
        facts: pulumi.Output[Facts],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mailroom:index:MailZone", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOutputOptions(parent=self)
        zone = cloudflare.get_zone_output(filter={"name": settings.domain, "match": "all"}, opts=invoke)
        self.zone_id = zone.zone_id.apply(lambda z: known_zone(settings.domain, z))
        self.name_servers = zone.name_servers

        # Which records exist depends on the settings alone; the facts fill in their values.
        # So every record is declared here, at the top level, and previews show them all (all but
        # the not-offered SRV records: infra.core.dns.NOT_OFFERED says why).
        every = facts.apply(lambda f: {r.key: r for r in records(settings, f)})
        for shape in (r for r in records(settings, Facts.placeholder(settings)) if r.hosted):
            record: pulumi.Output[Record] = every.apply(operator.itemgetter(shape.key))
            cloudflare.DnsRecord(
                f"{name}-{shape.key}",
                zone_id=self.zone_id,
                name=record.apply(lambda r: r.name),
                type=shape.type,
                ttl=shape.ttl,
                # Mail records must resolve to the server itself, never to Cloudflare's proxy.
                proxied=False,
                content=record.apply(record_content),
                data=record.apply(record_data),  # type: ignore[arg-type]
                priority=record.apply(lambda r: r.priority),
                comment=COMMENT,
                opts=child,
            )

        groups = cloudflare.get_api_token_permission_groups_list_output(
            name=DNS_WRITE, scope="com.cloudflare.api.account.zone", opts=invoke
        )
        token = cloudflare.ApiToken(
            f"{name}-certbot-token",
            name=f"mailroom certbot DNS-01 for {settings.domain}",
            policies=[
                cloudflare.ApiTokenPolicyArgs(
                    effect="allow",
                    permission_groups=groups.results.apply(
                        lambda rs: [
                            cloudflare.ApiTokenPolicyPermissionGroupArgs(id=r.id) for r in rs if r.name == DNS_WRITE
                        ]
                    ),
                    resources=self.zone_id.apply(token_policy_resources),
                )
            ],
            # Only the server runs certbot: the token is refused from any other address.
            condition=facts.apply(
                lambda f: cloudflare.ApiTokenConditionArgs(
                    request_ip=cloudflare.ApiTokenConditionRequestIpArgs(ins=token_addresses(f))
                )
            ),
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["value"]),
        )
        self.certbot_token = pulumi.Output.secret(token.value)
        self.register_outputs({"zoneId": self.zone_id, "nameServers": self.name_servers})

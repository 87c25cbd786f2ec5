"""MailZone: the Cloudflare side — every record of infra.records, and certbot's DNS token."""

from __future__ import annotations

import json

import pulumi
import pulumi_cloudflare as cloudflare

from infra.records import Facts, Record, records
from infra.settings import Settings

COMMENT = "managed by mailroom (Pulumi)"
DNS_WRITE = "DNS Write"


def record_args(record: Record) -> dict[str, object]:
    """A record in Cloudflare's terms: TXT quoted and split at 255, SRV and CAA as data."""
    if record.type == "TXT":
        return {"content": record.rdata()}
    if record.type == "SRV":
        data = {"priority": record.priority, "weight": record.weight, "port": record.port, "target": record.value}
        return {"data": data, "priority": record.priority}
    if record.type == "CAA":
        return {"data": {"flags": record.flags, "tag": record.tag, "value": record.value}}
    if record.type == "MX":
        return {"content": record.value, "priority": record.priority}
    return {"content": record.value}


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
        self.zone_id = zone.zone_id.apply(lambda z: z or "")
        self.name_servers = zone.name_servers

        # Which records exist depends on the settings alone; the facts fill in their values.
        # So every record is declared here, at the top level, and previews show them all.
        every = facts.apply(lambda f: {r.key: r for r in records(settings, f)})
        for shape in records(settings, Facts.placeholder(settings)):
            record = every.apply(lambda by_key, key=shape.key: by_key[key])
            args = record.apply(record_args)
            cloudflare.DnsRecord(
                f"{name}-{shape.key}",
                zone_id=self.zone_id,
                name=record.apply(lambda r: r.name),
                type=shape.type,
                ttl=shape.ttl,
                # Mail records must resolve to the server itself, never to Cloudflare's proxy.
                proxied=False,
                content=args.apply(lambda a: a.get("content")),  # type: ignore[arg-type]
                data=args.apply(lambda a: a.get("data")),  # type: ignore[arg-type]
                priority=args.apply(lambda a: a.get("priority")),  # type: ignore[arg-type]
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
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["value"]),
        )
        self.certbot_token = pulumi.Output.secret(token.value)
        self.register_outputs({"zoneId": self.zone_id, "nameServers": self.name_servers})

"""SesRelay: Amazon SES as the outbound relay — identity, MAIL FROM, events, SMTP credentials."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.core.dns import MAIL_FROM_LABEL
from infra.core.facts import ses_smtp_endpoint
from infra.core.settings import Settings

# Events the owner must hear about: they decide the account's reputation and sandbox status.
# Name limits (IAM CreateUser, SES CreateConfigurationSet, SNS CreateTopic).
IAM_USER_NAME_LIMIT = 64
CONFIGURATION_SET_NAME_LIMIT = 64
TOPIC_NAME_LIMIT = 256
NOTIFIED_EVENTS = ("BOUNCE", "COMPLAINT", "REJECT", "RENDERING_FAILURE")


def send_policy(identity_arn: str, configuration_set_arn: str, domain: str) -> str:
    """The IAM user's only permission: send raw mail from the domain, in the SES region.

    SES authorises a send against every identity it involves: the sender's (the domain) and, while
    the account is in the sandbox, each recipient's (a verified test address); and the
    configuration set. So the resources are the region's identities and the set, and the
    `ses:FromAddress` condition is what limits the sender: the domain and its subdomains (the
    server's own mail leaves as root@<host name>).
    """
    identities = identity_arn.rsplit(":identity/", 1)[0] + ":identity/*"
    document: dict[str, Any] = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "SendAsDomainOnly",
                "Effect": "Allow",
                "Action": "ses:SendRawEmail",
                "Resource": [identities, configuration_set_arn],
                "Condition": {"StringLike": {"ses:FromAddress": sender_patterns(domain)}},
            }
        ],
    }
    return json.dumps(document, indent=2)


def sender_patterns(domain: str) -> list[str]:
    """The From addresses the relay may send: the domain's, and its hosts' (IAM StringLike)."""
    return [f"*@{domain}", f"*@*.{domain}"]


def bounded_name(prefix: str, domain: str, limit: int, suffix: str = "") -> str:
    """PREFIX, the domain (dots as dashes) and SUFFIX, the domain shortened with a hash to fit LIMIT.

    IAM user and SES configuration set names hold at most 64 characters, a domain up to 253.
    A name that fits is left as it is, so existing stacks keep their resources.
    """
    name = prefix + domain.replace(".", "-") + suffix
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(domain.encode()).hexdigest()[:8]
    room = limit - len(prefix) - len(suffix) - len(digest) - 1
    return prefix + domain.replace(".", "-")[:room].rstrip("-") + "-" + digest + suffix


def topic_policy(topic_arn: str, account_id: str) -> str:
    """Lets SES (of this account only) publish events to the topic."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "SesPublishesEvents",
                    "Effect": "Allow",
                    "Principal": {"Service": "ses.amazonaws.com"},
                    "Action": "sns:Publish",
                    "Resource": topic_arn,
                    "Condition": {"StringEquals": {"AWS:SourceAccount": account_id}},
                }
            ],
        },
        indent=2,
    )


@dataclass(frozen=True)
class RelayArgs:
    """What the SES side needs to know of the settings."""

    domain: str
    region: str
    alert_email: str

    @classmethod
    def of(cls, settings: Settings) -> RelayArgs:
        return cls(domain=settings.domain, region=settings.ses_region, alert_email=settings.alert_email)


class SesRelay(pulumi.ComponentResource):
    identity: aws.sesv2.EmailIdentity
    dkim_tokens: pulumi.Output[list[str]]
    smtp_username: pulumi.Output[str]
    smtp_password: pulumi.Output[str]
    endpoint: str

    def __init__(self, name: str, args: RelayArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mailroom:index:SesRelay", name, None, opts)
        # An explicit provider: the SMTP password (v4) is derived for the provider's region, and
        # it must be the SES region, whatever the default AWS region of the machine running Pulumi.
        provider = aws.Provider(f"{name}-aws", region=args.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        domain = args.domain
        self.endpoint = ses_smtp_endpoint(args.region)

        config_set = aws.sesv2.ConfigurationSet(
            f"{name}-events",
            configuration_set_name=bounded_name("mailroom-", domain, CONFIGURATION_SET_NAME_LIMIT),
            reputation_options=aws.sesv2.ConfigurationSetReputationOptionsArgs(reputation_metrics_enabled=True),
            sending_options=aws.sesv2.ConfigurationSetSendingOptionsArgs(sending_enabled=True),
            opts=child,
        )
        self.identity = aws.sesv2.EmailIdentity(
            f"{name}-identity",
            email_identity=domain,
            configuration_set_name=config_set.configuration_set_name,
            dkim_signing_attributes=aws.sesv2.EmailIdentityDkimSigningAttributesArgs(
                next_signing_key_length="RSA_2048_BIT"
            ),
            opts=child,
        )
        # Bounces return to bounce.DOMAIN (SES's MX) so SPF aligns with the domain for DMARC.
        aws.sesv2.EmailIdentityMailFromAttributes(
            f"{name}-mail-from",
            email_identity=self.identity.email_identity,
            mail_from_domain=f"{MAIL_FROM_LABEL}.{domain}",
            behavior_on_mx_failure="USE_DEFAULT_VALUE",
            opts=child,
        )

        topic = aws.sns.Topic(
            f"{name}-notices", name=bounded_name("mailroom-", domain, TOPIC_NAME_LIMIT, "-notices"), opts=child
        )
        account = aws.get_caller_identity_output(opts=pulumi.InvokeOutputOptions(parent=self, provider=provider))
        aws.sns.TopicPolicy(
            f"{name}-notices-policy",
            arn=topic.arn,
            policy=pulumi.Output.all(topic.arn, account.account_id).apply(lambda a: topic_policy(a[0], a[1])),
            opts=child,
        )
        aws.sns.TopicSubscription(
            f"{name}-notices-email",
            topic=topic.arn,
            protocol="email",
            endpoint=args.alert_email,
            opts=child,
        )
        aws.sesv2.ConfigurationSetEventDestination(
            f"{name}-events-sns",
            configuration_set_name=config_set.configuration_set_name,
            event_destination_name="bounces-and-complaints",
            event_destination=aws.sesv2.ConfigurationSetEventDestinationEventDestinationArgs(
                enabled=True,
                matching_event_types=list(NOTIFIED_EVENTS),
                sns_destination=aws.sesv2.ConfigurationSetEventDestinationEventDestinationSnsDestinationArgs(
                    topic_arn=topic.arn
                ),
            ),
            opts=child,
        )

        user = aws.iam.User(
            f"{name}-smtp-user", name=bounded_name("mailroom-smtp-", domain, IAM_USER_NAME_LIMIT), opts=child
        )
        aws.iam.UserPolicy(
            f"{name}-smtp-send",
            user=user.name,
            policy=pulumi.Output.all(self.identity.arn, config_set.arn).apply(
                lambda arns: send_policy(arns[0], arns[1], domain)
            ),
            opts=child,
        )
        key = aws.iam.AccessKey(
            f"{name}-smtp-key",
            user=user.name,
            opts=pulumi.ResourceOptions(
                parent=self, provider=provider, additional_secret_outputs=["secret", "sesSmtpPasswordV4"]
            ),
        )
        self.dkim_tokens = self.identity.dkim_signing_attributes.apply(lambda a: list(a.tokens or []) if a else [])
        self.smtp_username = key.id
        self.smtp_password = pulumi.Output.secret(key.ses_smtp_password_v4)
        self.register_outputs({"endpoint": self.endpoint, "smtpUsername": self.smtp_username})

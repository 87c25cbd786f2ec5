"""Stand-in secrets for offline renders, tests and the lab: never real credentials."""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from infra.core.bundle import ServerSecrets

DKIM_KEY_BITS = 2048


def placeholder_secrets() -> ServerSecrets:
    """Clearly fake values, for reading a render: nothing here works as a credential."""
    return ServerSecrets(
        dkim_private_key_pem="<secret: the DKIM private key from Pulumi state>",
        relay_username="<relay user name>",
        relay_password="<secret: the relay SMTP password from Pulumi state>",
        certbot_token="<secret: the Cloudflare DNS token from Pulumi state>",
        webmail_des_key="<secret: webmail key>",
        backup_access_key_id="<backup bucket access key id>",
        backup_secret_access_key="<secret: the backup bucket's secret key from Pulumi state>",
        backup_password="<secret: the restic repository password from Pulumi state>",
    )


def dkim_private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=DKIM_KEY_BITS)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def generated_secrets() -> ServerSecrets:
    """Freshly generated values of the right form, so the daemons can load them."""
    return ServerSecrets(
        dkim_private_key_pem=dkim_private_key_pem(),
        relay_username="AKIA" + secrets.token_hex(8).upper(),
        relay_password=secrets.token_urlsafe(32),
        certbot_token=secrets.token_urlsafe(30),
        webmail_des_key=secrets.token_hex(12),
        backup_access_key_id="AKIA" + secrets.token_hex(8).upper(),
        backup_secret_access_key=secrets.token_urlsafe(30),
        backup_password=secrets.token_hex(20),
    )

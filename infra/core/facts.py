"""Fixed facts: the ports, paths and endpoints every part of mailroom agrees on, each declared once.

The program, the server render, the lab and the tests import them from here; a template gets them
as values. What is only known at deploy time (addresses, keys) is `infra.core.dns.Facts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings imports this module: the name is for the type checker only
    from infra.core.settings import BackupTarget

# Where the repository lives: Pulumi.yaml, the stack files and the server's templates.
PROJECT_DIR = Path(__file__).resolve().parents[2]
PROJECT_FILE = PROJECT_DIR / "Pulumi.yaml"
CLOUD_INIT = PROJECT_DIR / "cloud_init"
SERVER_FILES = CLOUD_INIT / "files"
APPLY_SCRIPT = CLOUD_INIT / "apply.py"
# The status checks the server runs (and the operator's `check` imports): shipped in the bundle.
STATUS_SCRIPT = CLOUD_INIT / "status.py"

# Ports the server serves.
SSH_PORT = 22
SMTP_PORT = 25
SUBMISSION_PORT = 587  # STARTTLS submission, and the port both relays take authenticated mail on
SUBMISSIONS_PORT = 465  # implicit TLS submission
IMAPS_PORT = 993
MANAGESIEVE_PORT = 4190
HTTP_PORT = 80
HTTPS_PORT = 443
RELAY_PORT = SUBMISSION_PORT

# Paths on the server.
MAIL_DIR = "/var/mail/vhosts"
# Written by the last step of the bootstrap; the deploy waits for it before sending the bundle.
BOOTSTRAP_MARKER = "/var/lib/mailroom-bootstrapped"
# Installed by the user-data, run by its runcmd; an administrator may run it again by hand.
MOUNT_VOLUME_SCRIPT = "/usr/local/sbin/mailroom-mount-volume"
# Where the install step puts the apply script the bundle is sent to.
APPLY_PATH = "/usr/local/lib/mailroom/apply.py"
# The status checks and what they expect (the settings' hosts, daemons and the program's records).
STATUS_PATH = "/usr/local/lib/mailroom/status.py"
STATUS_CONFIG = "/etc/mailroom/status.json"
# Postfix's queue directory: the milters' sockets live below it (reachable from its chroot).
QUEUE_DIR = "/var/spool/postfix"

# Outbound relays' SMTP endpoints.
SMTP2GO_HOST = "mail.smtp2go.com"


def ses_smtp_endpoint(region: str) -> str:
    """Amazon SES's SMTP endpoint in a region."""
    return f"email-smtp.{region}.amazonaws.com"


def backup_endpoint(target: BackupTarget | str, region: str) -> str:
    """The S3 API host of the off-site backup's bucket: Amazon S3's or DigitalOcean Spaces' in the
    region, or "" for backupTarget none (a `BackupTarget` is a str, so either compares)."""
    if target == "s3":
        return f"s3.{region}.amazonaws.com"
    if target == "spaces":
        return f"{region}.digitaloceanspaces.com"
    return ""

"""The server's side of the off-site backup: where its script, settings and result live, and what
the script is told (pure). The script itself is cloud_init/backup.py; the bucket and its key are
declared by infra.cloud.backup."""

from __future__ import annotations

from typing import Any

from infra.core.facts import CLOUD_INIT, MAIL_DIR, backup_endpoint
from infra.core.settings import BackupTarget, Settings, SpamFilter

BACKUP_SCRIPT = CLOUD_INIT / "backup.py"
BACKUP_PATH = "/usr/local/lib/mailroom/backup.py"
BACKUP_CONFIG = "/etc/mailroom/backup.json"
BACKUP_ENV = "/etc/mailroom/backup.env"
# The last run's result, which the status check reads.
BACKUP_RESULT = "/var/lib/mailroom/backup.json"
# The staging copy dsync keeps up to date, on the mail volume (it takes as much room as the mail).
BACKUP_STAGING = f"{MAIL_DIR}/.backup-staging"
# A backup older than this (hours) fails the status check: one nightly run was missed.
BACKUP_MAX_AGE_HOURS = 26
# restic reads back and verifies this share of the repository's packs after each run.
CHECK_SUBSET = "5%"


# Whether the server's own key is kept from destroying the backup's history (old object versions).
# S3: yes, its IAM policy denies s3:DeleteObjectVersion and changes to versioning and lifecycle
# (infra.cloud.backup). Spaces: no. DigitalOcean's documentation names a bucket-scoped `readwrite`
# key "Read/Write/Delete" (docs.digitalocean.com/products/spaces/how-to/manage-access/) and lists
# no finer grant, and the open request "Separate read/write and delete access keys"
# (ideas.digitalocean.com/storage/p/separate-read-write-and-delete-access-keys) asks for exactly
# that: someone who takes the server may be able to destroy the backup. The status check says so.
HISTORY_PROTECTED = {BackupTarget.S3: True, BackupTarget.SPACES: False, BackupTarget.NONE: False}


def enabled(settings: Settings) -> bool:
    return settings.backup_target is not BackupTarget.NONE


def endpoint(settings: Settings) -> str:
    """The S3 API host the repository lives on."""
    return backup_endpoint(settings.backup_target, settings.backup_region)


def repository(settings: Settings) -> str:
    """restic's name for the repository (not a secret)."""
    return f"s3:https://{endpoint(settings)}/{settings.backup_bucket}" if enabled(settings) else ""


def backup_config(settings: Settings) -> dict[str, Any]:
    """What /usr/local/lib/mailroom/backup.py reads."""
    return {
        "host": settings.host_name,
        "mail_dir": MAIL_DIR,
        "staging_dir": BACKUP_STAGING,
        "cache_dir": "/var/cache/mailroom/restic",
        "result": BACKUP_RESULT,
        "spam_filter": settings.spam_filter.value,
        "spamd_user": "debian-spamd" if settings.spam_filter is SpamFilter.SPAMASSASSIN else "",
        # The server's own settings and records; the secrets are the stack's to give again.
        "extra_paths": ["/etc/mailroom"],
        # Dovecot rebuilds its cache; the credentials are not the backup's to keep.
        # Nor the TLS key: certbot issues a new certificate for a new server.
        "exclude": [BACKUP_ENV, "/etc/mailroom/tls", "dovecot.index.cache"],
        "check_subset": CHECK_SUBSET,
        "keep": {
            "daily": settings.backup_keep_daily,
            "weekly": settings.backup_keep_weekly,
            "monthly": settings.backup_keep_monthly,
        },
    }

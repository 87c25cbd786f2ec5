"""MailBackup: the off-site backup's bucket, the server's key to it and restic's password.

The server backs the mail volume up every night with restic, over the S3 API, into a versioned
bucket (`backupTarget` s3: Amazon S3; spaces: DigitalOcean Spaces). The key the server holds can
add to the repository and remove what restic removes (its lock files, pruned packs), but in a
versioned bucket a delete only adds a delete marker: every older version stays until the
lifecycle rule expires it, `retention_days` after it stopped being current. Someone who takes the
server, key and all, can hide the backup but not destroy it within that time.

The bucket is protected: `pulumi destroy` (or a change that would replace it) stops with an error
instead of deleting the backups; an owner who means it unprotects it with `pulumi state unprotect`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_digitalocean as do
import pulumi_random as random

from infra.cloud.relay import IAM_USER_NAME_LIMIT, bounded_name
from infra.core.facts import backup_endpoint
from infra.core.settings import BackupTarget, Settings

# restic's password for the repository (letters and digits, so no shell or env-file quoting).
PASSWORD_LENGTH = 40
# After restic's longest keep (monthly), how long a deleted version still stays, in days.
RETENTION_MARGIN_DAYS = 30
# An upload interrupted this long ago is dropped (its parts are billed until then).
MULTIPART_ABORT_DAYS = 7
SPACES_KEY_NAME_LIMIT = 64

# What the server's key may do, all it needs for restic's S3 backend (backup, forget, prune,
# check): list the bucket and find its region; read, write and delete objects (a delete in a
# versioned bucket is a delete marker).
BUCKET_ACTIONS = ("s3:ListBucket", "s3:GetBucketLocation")
OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject")
# What it may never do, even if another policy is attached to the user later: destroy a version
# (DeleteObject with a versionId is authorised as s3:DeleteObjectVersion), turn versioning or the
# lifecycle rule off, open the bucket, or delete it or its settings.
DENIED_ACTIONS = (
    "s3:DeleteObjectVersion",
    "s3:PutBucketVersioning",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketPolicy",
    "s3:PutBucketPublicAccessBlock",
    "s3:DeleteBucket*",
)


def retention_days(keep_daily: int, keep_weekly: int, keep_monthly: int) -> int:
    """How long a noncurrent version stays: restic's longest keep, in days, plus a margin."""
    return max(keep_daily, keep_weekly * 7, keep_monthly * 31) + RETENTION_MARGIN_DAYS


def bucket_arn(bucket: str) -> str:
    """An S3 bucket's ARN (bucket names are global: no region, no account)."""
    return f"arn:aws:s3:::{bucket}"


def key_policy(bucket: str) -> str:
    """The backup user's only permissions: restic's, on this bucket, and an explicit deny of the rest."""
    arn = bucket_arn(bucket)
    document: dict[str, Any] = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "FindTheBucket", "Effect": "Allow", "Action": list(BUCKET_ACTIONS), "Resource": arn},
            {"Sid": "ReadWriteObjects", "Effect": "Allow", "Action": list(OBJECT_ACTIONS), "Resource": f"{arn}/*"},
            {
                "Sid": "NeverDestroyHistory",
                "Effect": "Deny",
                "Action": list(DENIED_ACTIONS),
                "Resource": [arn, f"{arn}/*"],
            },
        ],
    }
    return json.dumps(document, indent=2)


@dataclass(frozen=True)
class BackupArgs:
    """What the off-site backup needs to know of the settings."""

    target: BackupTarget
    bucket: str
    region: str
    host_name: str
    retention_days: int

    @classmethod
    def of(cls, settings: Settings) -> BackupArgs:
        days = retention_days(settings.backup_keep_daily, settings.backup_keep_weekly, settings.backup_keep_monthly)
        return cls(settings.backup_target, settings.backup_bucket, settings.backup_region, settings.host_name, days)


class MailBackup(pulumi.ComponentResource):
    access_key_id: pulumi.Output[str]
    secret_access_key: pulumi.Output[str]
    password: pulumi.Output[str]
    bucket: pulumi.Output[str]
    endpoint: str

    def __init__(self, name: str, args: BackupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mailroom:index:MailBackup", name, None, opts)
        if args.target is BackupTarget.NONE:
            raise ValueError("backupTarget none declares no backup: the program declares no MailBackup")
        self.endpoint = backup_endpoint(args.target, args.region)
        if args.target is BackupTarget.S3:
            self._s3(name, args)
        else:
            self._spaces(name, args)
        password = random.RandomPassword(
            "backup-password",
            length=PASSWORD_LENGTH,
            special=False,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["result"]),
        )
        # The password and the key reach the server in the bundle only: never a plain output.
        self.password = pulumi.Output.secret(password.result)
        self.register_outputs({"bucket": self.bucket, "endpoint": self.endpoint})

    def _s3(self, name: str, args: BackupArgs) -> None:
        # An explicit provider: the bucket lives in backupRegion, whatever the default AWS region
        # of the machine running Pulumi.
        provider = aws.Provider(f"{name}-aws", region=args.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        # protect: a `pulumi destroy` stops here rather than delete the backups (and the versions).
        bucket = aws.s3.Bucket(
            f"{name}-bucket",
            bucket=args.bucket,
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(protect=True)),
        )
        self.bucket = bucket.bucket
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership",
            bucket=bucket.bucket,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=child,
        )
        aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access",
            bucket=bucket.bucket,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        # Deleting this resource would suspend versioning: protected as the bucket is.
        versioning = aws.s3.BucketVersioning(
            f"{name}-versioning",
            bucket=bucket.bucket,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status="Enabled"),
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(protect=True)),
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption",
            bucket=bucket.bucket,
            rules=[
                aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256"
                    )
                )
            ],
            opts=child,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-lifecycle",
            bucket=bucket.bucket,
            rules=[
                aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id="expire-deleted-versions",
                    status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(),  # every object
                    noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                        noncurrent_days=args.retention_days
                    ),
                    # A delete marker left alone once its versions expired (restic's old locks).
                    expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(expired_object_delete_marker=True),
                    abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                        days_after_initiation=MULTIPART_ABORT_DAYS
                    ),
                )
            ],
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[versioning])),
        )

        user = aws.iam.User(
            f"{name}-user", name=bounded_name("mailroom-backup-", args.host_name, IAM_USER_NAME_LIMIT), opts=child
        )
        aws.iam.UserPolicy(f"{name}-user-policy", user=user.name, policy=key_policy(args.bucket), opts=child)
        key = aws.iam.AccessKey(
            f"{name}-key",
            user=user.name,
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(additional_secret_outputs=["secret"])),
        )
        self.access_key_id = pulumi.Output.secret(key.id)
        self.secret_access_key = pulumi.Output.secret(key.secret)

    def _spaces(self, name: str, args: BackupArgs) -> None:
        child = pulumi.ResourceOptions(parent=self)
        # protect: a `pulumi destroy` stops here rather than delete the backups (and the versions).
        bucket = do.SpacesBucket(
            f"{name}-bucket",
            name=args.bucket,
            region=args.region,
            acl="private",
            versioning=do.SpacesBucketVersioningArgs(enabled=True),
            lifecycle_rules=[
                do.SpacesBucketLifecycleRuleArgs(
                    id="expire-deleted-versions",
                    enabled=True,
                    noncurrent_version_expiration=do.SpacesBucketLifecycleRuleNoncurrentVersionExpirationArgs(
                        days=args.retention_days
                    ),
                    # A delete marker left alone once its versions expired (restic's old locks).
                    expiration=do.SpacesBucketLifecycleRuleExpirationArgs(expired_object_delete_marker=True),
                    abort_incomplete_multipart_upload_days=MULTIPART_ABORT_DAYS,
                )
            ],
            opts=pulumi.ResourceOptions(parent=self, protect=True),
        )
        self.bucket = bucket.name
        # Scoped to this bucket only; what readwrite allows is infra.core.backup.HISTORY_PROTECTED's note.
        key = do.SpacesKey(
            f"{name}-key",
            name=bounded_name("mailroom-backup-", args.host_name, SPACES_KEY_NAME_LIMIT),
            grants=[do.SpacesKeyGrantArgs(bucket=bucket.name, permission="readwrite")],
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(additional_secret_outputs=["secretKey"])),
        )
        self.access_key_id = pulumi.Output.secret(key.access_key)
        self.secret_access_key = pulumi.Output.secret(key.secret_key)

"""The bundle: every file the server gets, and what to do when they change.

A `Bundle` is plain data. The server render (infra.core.render) produces it from settings and
secrets; the provisioning component sends it, as JSON on the stdin of one remote command, to
the apply script (cloud_init/apply.py), which first runs each changed service's prepare steps
and checker on the new files in a private mount namespace (the new files overlaid on the live
directories, so nothing live changes), installs the files only if every check passed, and
reloads only the services whose files changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

BUNDLE_VERSION = 1


@dataclass(frozen=True)
class ServerSecrets:
    """Secrets the server needs, all produced or held by Pulumi. Never logged, never in user-data."""

    dkim_private_key_pem: str
    relay_username: str  # SES access key id or SMTP2GO user; empty for direct delivery
    relay_password: str  # SES SMTP password (v4) or SMTP2GO password; empty for direct delivery
    certbot_token: str  # Cloudflare API token limited to DNS edits in the zone (DNS-01)
    webmail_des_key: str  # Roundcube's session encryption key (24 characters)
    # The off-site backup's restic repository password and the bucket's access key (empty: none).
    backup_password: str = ""
    backup_access_key_id: str = ""
    backup_secret_access_key: str = ""

    def __repr__(self) -> str:
        return "ServerSecrets(********)"


@dataclass(frozen=True)
class BundleFile:
    path: str  # absolute destination on the server
    content: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False  # holds a secret: root-only mode expected, content masked in renders

    def __repr__(self) -> str:
        shown = "********" if self.secret else f"{len(self.content)} characters"
        return f"BundleFile({self.path!r}, {oct(self.mode)}, {self.owner}:{self.group}, {shown})"


@dataclass(frozen=True)
class Service:
    """A daemon and the files it reads. Paths are prefixes: /etc/postfix/ owns everything below."""

    name: str
    paths: tuple[str, ...]
    # Run on the new files (e.g. postmap): staged first, and again once installed; a failure refuses them.
    prepare: tuple[str, ...] = ()
    # The daemon's own checker, on the staged files; non-zero exit = refuse them, nothing installed.
    check: tuple[str, ...] = ()
    # Run when one of its files changed and every check passed (e.g. systemctl reload postfix).
    reload: str = ""
    # The systemd units that must be active for this service to work: the status check asks each.
    units: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bundle:
    files: tuple[BundleFile, ...]
    services: tuple[Service, ...] = field(default=())
    # Distribution packages that must be installed before the files (a mode switch, e.g. to
    # rspamd, installs its packages) and those that must be absent (SpamAssassin under rspamd).
    packages: tuple[str, ...] = ()
    absent_packages: tuple[str, ...] = ()
    # debconf-set-selections lines, given before the packages are installed.
    debconf: tuple[str, ...] = ()

    def to_json(self) -> str:
        """The canonical form sent to the server (sorted, stable: equal bundles, equal text)."""
        doc = {
            "version": BUNDLE_VERSION,
            "files": sorted((asdict(f) for f in self.files), key=lambda f: f["path"]),
            "services": [asdict(s) for s in self.services],
            "packages": sorted(self.packages),
            "absent_packages": sorted(self.absent_packages),
            "debconf": list(self.debconf),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Content hash; the remote apply command re-runs exactly when it changes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def file(self, path: str) -> BundleFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

"""The remote steps: the commands that converge the server after the droplet exists, as plain data.

Five steps, run over SSH as the admin user with mailroom's deploy key: wait until cloud-init's
bootstrap finished; check the mail volume is mounted (and, when the volume is to leave this
droplet, stop mail and unmount it first); install the apply script; send the bundle to it;
obtain the Let's Encrypt certificate. The program declares each as a `command.remote.Command`
(infra.cloud.provisioning), the offline rehearsal reads them back in dependency order, and the lab
runs them over SSH: one `Step` type for all three.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from infra.core.facts import APPLY_PATH, APPLY_SCRIPT, BOOTSTRAP_MARKER, MAIL_DIR, MOUNT_VOLUME_SCRIPT
from infra.core.user_data import mount_unit

# cloud-init exits 2 when it finished with recoverable warnings; the marker written by the last
# runcmd of the user-data is what says the bootstrap completed.
WAIT_FOR_BOOTSTRAP = f"""set -eu
cloud-init status --wait >/dev/null 2>&1 || true
if [ ! -e {BOOTSTRAP_MARKER} ]; then
  echo "the cloud-init bootstrap did not finish; see /var/log/cloud-init-output.log" >&2
  exit 1
fi
echo "bootstrap finished"
"""
INSTALL_APPLY_SCRIPT = f"sudo install -D -m 0755 -o root -g root /dev/stdin {APPLY_PATH}"
RUN_APPLY = f"sudo /usr/bin/python3 {APPLY_PATH}"
# After the bundle (which holds certbot's token and installs a self-signed certificate):
# Let's Encrypt's certificate over DNS-01; certbot's own timer renews it.
ISSUE_CERTIFICATE = "sudo /usr/local/sbin/mailroom-certificate --issue"
# A volume attached after the droplet's first boot (a new, empty one, the old one lost) is not
# mounted by cloud-init, which ran once: its script, safe to run again, formats it only if empty
# and mounts it; Dovecot, which stopped with the mount it requires, starts on it again.
VOLUME_MOUNTED = f"""set -eu
if ! mountpoint -q {MAIL_DIR}; then
  sudo {MOUNT_VOLUME_SCRIPT}
  if getent passwd vmail >/dev/null; then
    sudo install -d -o vmail -g vmail -m 0750 {MAIL_DIR}
    sudo systemctl start dovecot.service
    echo "a new mail volume was mounted at {MAIL_DIR}"
  fi
fi
if ! mountpoint -q {MAIL_DIR}; then
  echo "the mail volume is not mounted at {MAIL_DIR}; see /var/log/cloud-init-output.log" >&2
  exit 1
fi
echo "the mail volume is mounted at {MAIL_DIR}"
"""
# DigitalOcean attaches a volume to one droplet at a time, and detaching it under a running
# Dovecot or Postfix loses what they were writing. Run on the droplet the volume leaves (a
# replaced droplet, or `pulumi destroy`) before the attachment is deleted: mail stops, the
# filesystem is flushed and unmounted.
RELEASE_VOLUME = f"""set -eu
sudo systemctl stop postfix.service dovecot.service
sudo systemctl stop {mount_unit()}
sync
echo "mail stopped and the volume unmounted: it may be detached"
"""


@dataclass(frozen=True)
class Step:
    """One remote command: its name, the command line the remote shell runs, and its stdin."""

    name: str
    create: str
    stdin: str | None = None
    delete: str | None = None  # run when the step's resource is deleted (on the old droplet)

    def __repr__(self) -> str:  # stdin may hold the bundle and its secrets
        return f"Step({self.name!r}, stdin={'yes' if self.stdin else 'no'})"


WAIT, VOLUME, INSTALL, APPLY, ISSUE = STEPS = (
    Step("wait-for-bootstrap", WAIT_FOR_BOOTSTRAP),
    Step("mail-volume", VOLUME_MOUNTED, delete=RELEASE_VOLUME),
    Step("install-apply-script", INSTALL_APPLY_SCRIPT),
    Step("apply-bundle", RUN_APPLY),
    Step("issue-certificate", ISSUE_CERTIFICATE),
)


def apply_script() -> str:
    return APPLY_SCRIPT.read_text()


def script_digest() -> str:
    return hashlib.sha256(apply_script().encode()).hexdigest()

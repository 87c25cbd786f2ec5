"""The droplet's user-data: a #cloud-config rendered from cloud_init/user-data.yaml.j2.

It runs once, at first boot, and holds no secret (DigitalOcean shows user-data to anyone with
API access). Everything else reaches the server through the remote commands
(infra.cloud.provisioning), so a change never needs a new droplet.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

from infra.core.facts import BOOTSTRAP_MARKER, CLOUD_INIT, MAIL_DIR, MOUNT_VOLUME_SCRIPT
from infra.core.modes import debconf_selections, packages
from infra.core.settings import Settings

VOLUME_LABEL = "mailroom"
# DigitalOcean attaches a volume within seconds of the droplet's creation; the packages take
# minutes before this runs, so five minutes more means the attachment itself failed.
VOLUME_WAIT_SECONDS = 300
# 1 GB: spamd or rspamd at peak plus Roundcube can briefly exceed a 1 GB droplet's memory.
SWAP_BYTES = 1024 * 1024 * 1024


def volume_device(settings: Settings) -> str:
    """Where DigitalOcean exposes the attached volume, by its name."""
    return f"/dev/disk/by-id/scsi-0DO_Volume_{settings.volume_name}"


def template_environment(directory: Path = CLOUD_INIT) -> jinja2.Environment:
    """Templates are the files the server gets: no escaping, no undefined value let through.

    A value in a shell script goes through the `sh` filter (shlex.quote): whatever a setting
    holds, the shell reads it as one word and never runs any of it.
    """
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters["sh"] = lambda value: shlex.quote(str(value))
    return environment


def mount_unit(path: str = MAIL_DIR) -> str:
    """systemd's name for the mount unit of PATH (what `systemd-escape -p --suffix=mount` gives)."""
    return path.strip("/").replace("-", "\\x2d").replace("/", "-") + ".mount"


def render_mount_volume_script(settings: Settings, wait_seconds: int = VOLUME_WAIT_SECONDS) -> str:
    """The shell script that formats (only if empty) and mounts the mail volume."""
    return (
        template_environment()
        .get_template("mount-volume.sh.j2")
        .render(
            volume_device=volume_device(settings),
            volume_label=VOLUME_LABEL,
            volume_wait_seconds=wait_seconds,
            mail_dir=MAIL_DIR,
            mount_unit=mount_unit(),
        )
    )


def render_user_data(settings: Settings) -> str:
    """The #cloud-config the droplet boots with: settings only, never a secret."""
    return (
        template_environment()
        .get_template("user-data.yaml.j2")
        .render(
            host_name=settings.host_name,
            host_label=settings.host_label,
            admin_user=settings.admin_user,
            ssh_public_keys=settings.ssh_public_keys,
            swap_bytes=SWAP_BYTES,
            mount_volume_path=MOUNT_VOLUME_SCRIPT,
            mount_volume_script=render_mount_volume_script(settings),
            bootstrap_marker=BOOTSTRAP_MARKER,
            packages=packages(settings),
            debconf=debconf_selections(settings),
        )
    )

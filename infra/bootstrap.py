"""The droplet's user-data: a #cloud-config rendered from cloud_init/user-data.yaml.j2.

It runs once, at first boot, and holds no secret. Everything else reaches the server through
the remote commands (infra.provisioning), so a change never needs a new droplet.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from infra.packages import packages
from infra.settings import Settings

TEMPLATES = Path(__file__).resolve().parent.parent / "cloud_init"
MAIL_DIR = "/var/mail/vhosts"
SWAP_BYTES = 1024 * 1024 * 1024


def volume_device(settings: Settings) -> str:
    """Where DigitalOcean exposes the attached volume, by its name."""
    return f"/dev/disk/by-id/scsi-0DO_Volume_{settings.volume_name}"


def template_environment(directory: Path = TEMPLATES) -> jinja2.Environment:
    """Templates are the files the server gets: no escaping, no undefined value let through."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_user_data(settings: Settings) -> str:
    return (
        template_environment()
        .get_template("user-data.yaml.j2")
        .render(
            host_name=settings.host_name,
            host_label=settings.host_label,
            admin_user=settings.admin_user,
            ssh_public_keys=settings.ssh_public_keys,
            swap_bytes=SWAP_BYTES,
            volume_device=volume_device(settings),
            mail_dir=MAIL_DIR,
            packages=packages(settings),
            image=settings.image.value,
        )
    )

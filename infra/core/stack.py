"""Stack files read the way the Pulumi CLI reads them, for the offline commands and the tests.

The CLI merges Pulumi.yaml defaults with Pulumi.<stack>.yaml and hands the program strings
(JSON for non-strings). `stack_config` does the same from the files on disk, so the offline
plan, the render and the lab see exactly what `pulumi up` would, with one difference: secret
settings that the stack file holds encrypted (or leaves to `pulumi config set --secret`) are
replaced by stand-ins, which are never real credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from infra.core.facts import PROJECT_DIR

PROJECT = "mailroom"


class StackError(ValueError):
    pass


def stack_names(project_dir: Path = PROJECT_DIR) -> list[str]:
    return sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in project_dir.glob("Pulumi.*.yaml"))


def stack_file(stack: str, project_dir: Path = PROJECT_DIR) -> Path:
    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise StackError(f"stack {stack!r}: no file {path.name}; stacks here: {', '.join(stack_names(project_dir))}")
    return path


def stand_in_hash(address: str) -> str:
    """A well-formed bcrypt hash that no password matches (its digest is not bcrypt's output)."""
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    digest = hashlib.sha256(address.encode()).digest() * 3
    return "{BLF-CRYPT}$2y$10$" + "".join(alphabet[b % 64] for b in digest[:53])


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (true, 25, [a, b])."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise StackError(f"--set {text!r}: expected key=value, e.g. --set spamFilter=rspamd")
    return key.removeprefix(f"{PROJECT}:"), yaml.safe_load(value) if value else ""


def encrypted_keys(stack: str, project_dir: Path = PROJECT_DIR) -> list[str]:
    """The settings (bare keys) the stack file holds encrypted: only the Pulumi CLI can read them."""
    document = yaml.safe_load(stack_file(stack, project_dir).read_text()) or {}
    return [
        key.partition(":")[2]
        for key, value in (document.get("config") or {}).items()
        if key.partition(":")[0] == PROJECT and isinstance(value, dict) and "secure" in value
    ]


def stack_config(
    stack: str, overrides: Mapping[str, Any] | None = None, project_dir: Path = PROJECT_DIR
) -> dict[str, Any]:
    """The stack's settings as plain values (bare keys), stand-ins filled in for missing secrets."""
    document = yaml.safe_load(stack_file(stack, project_dir).read_text()) or {}
    raw: dict[str, Any] = {}
    for key, value in (document.get("config") or {}).items():
        namespace, _, name = key.partition(":")
        if namespace != PROJECT:
            continue  # provider settings such as digitalocean:token are not ours
        if isinstance(value, dict) and "secure" in value:
            continue  # encrypted: only the Pulumi CLI can read it; a stand-in follows
        raw[name] = value
    raw.update(overrides or {})
    if "passwordHashes" not in raw and isinstance(raw.get("mailboxes"), list):
        addresses = [str(line).split()[0].lower() for line in raw["mailboxes"] if str(line).split()]
        raw["passwordHashes"] = [f"{a} {stand_in_hash(a)}" for a in addresses]
    if raw.get("relay") == "smtp2go" and "smtp2goPassword" not in raw:
        raw["smtp2goPassword"] = "stand-in-smtp2go-password"
    return raw

"""Offline commands: `python -m infra plan|zone|render --stack STACK`.

None of them needs a cloud account or sends anything anywhere: they read the stack files the way
the Pulumi CLI does and run the program (or its pure parts) locally.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.core.settings import Settings, SettingsError, parse_settings
from infra.core.stack import StackError, encrypted_keys, parse_override, stack_config, stack_names

if TYPE_CHECKING:
    from infra.tools.rehearsal import Declared

# A multi-line text input (a script, a config) is shown in full up to this many lines; longer
# ones (the user-data, the apply script) are summarised, with where to read them in full.
MAX_BLOCK_LINES = 24
OFFLINE_BANNER = (
    "OFFLINE PLAN (evaluated under Pulumi mocks; nothing was sent to any cloud; ids, addresses and keys are stand-ins)"
)
# Stands for mailroom's deploy key in a render with placeholder secrets: a line sshd ignores.
PLACEHOLDER_DEPLOY_KEY = "ssh-ed25519 PLACEHOLDER-NOT-A-KEY mailroom-deploy-key-generated-by-pulumi-up"


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None or value == "":
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # numbers travel as floats: show 22, not 22.0
    return str(value)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list)) and not (isinstance(value, str) and "\n" in value)


def _is_flat(value: Any) -> bool:
    """A value that reads well on one line: a scalar, a list of scalars, or a mapping of those."""
    if isinstance(value, list):
        return all(_is_scalar(v) for v in value)
    if isinstance(value, dict):
        return all(_is_scalar(v) or (isinstance(v, list) and _is_flat(v)) for v in value.values())
    return _is_scalar(value)


def _inline(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_inline(v)}" for k, v in sorted(value.items()))
    return _scalar(value)


def _json_document(text: str) -> Any:
    """A JSON object or array held in a string (an IAM policy...), or None."""
    if not text.lstrip().startswith(("{", "[")):
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, (dict, list)) else None


def shown_lines(key: str, value: Any, pad: str) -> list[str]:
    """An input as readable lines: one list item per line, JSON indented, strings in full."""
    if isinstance(value, str):
        document = _json_document(value)
        if document is not None:
            return [f"{pad}{key}: (JSON)"] + [f"{pad}  {line}" for line in json.dumps(document, indent=2).splitlines()]
        text = value.rstrip("\n")
        if "\n" not in text:
            return [f"{pad}{key}: {_scalar(text)}"]
        lines = text.splitlines()
        if len(lines) <= MAX_BLOCK_LINES:
            return [f"{pad}{key}: |"] + [f"{pad}  {line}" for line in lines]
        return [f"{pad}{key}: {lines[0]!r}... ({len(lines)} lines, {len(value)} characters)"]
    if isinstance(value, list):
        if _is_flat(value):
            return [f"{pad}{key}: {_inline(value)}"]
        out = [f"{pad}{key}:"]
        for item in value:
            if _is_flat(item):
                out.append(f"{pad}  - {_inline(item)}")
            else:
                out.append(f"{pad}  -")
                for k, v in sorted(item.items()) if isinstance(item, dict) else [("value", item)]:
                    out += shown_lines(k, v, pad + "    ")
        return out
    if isinstance(value, dict):
        if not value:
            return [f"{pad}{key}: {{}}"]
        out = [f"{pad}{key}:"]
        for k, v in sorted(value.items()):
            out += shown_lines(k, v, pad + "  ")
        return out
    return [f"{pad}{key}: {_scalar(value)}"]


def resource_options(r: Declared) -> list[str]:
    """Every resource option the program set on R, as the plan shows them beside it."""
    switches = (
        ("protect", r.protect),
        ("retain-on-delete", r.retain_on_delete),
        ("delete-before-replace", r.delete_before_replace),
    )
    flags = [flag for flag, on in switches if on]
    lists = (
        ("ignore-changes", r.ignore_changes),
        ("replace-on-changes", r.replace_on_changes),
        ("secret-outputs", r.additional_secret_outputs),
    )
    flags += [f"{option}: {','.join(dict.fromkeys(values))}" for option, values in lists if values]
    if r.depends_on:  # by name: a URN ends in its resource's name
        flags.append(f"depends-on: {','.join(urn.split('::')[-1] for urn in r.depends_on)}")
    # A provider reference is "URN::ID", the URN ending in the provider's name.
    provider = r.provider.split("::")[-2] if r.provider.count("::") >= 4 else ""
    if provider and not provider.startswith("default"):
        flags.append(f"provider: {provider}")
    return flags


def plan_lines(stack: str, overrides: dict[str, Any]) -> list[str]:
    """The resource tree the program declares, secrets masked, as lines of text."""
    from infra.tools.rehearsal import run_program

    run = run_program(stack, overrides)
    children: dict[str, list[Any]] = {}
    for r in run.resources:
        children.setdefault(r.parent, []).append(r)
    lines = [OFFLINE_BANNER, f"stack {stack}: {len(run.resources)} resources"]

    def walk(parent: str, depth: int) -> None:
        for r in sorted(children.get(parent, []), key=lambda r: (r.custom, r.type, r.name)):
            flags = resource_options(r)
            suffix = f"  [{'; '.join(flags)}]" if flags else ""
            lines.append(f"{'  ' * depth}+ {r.type}  {r.name}{suffix}")
            pad = "  " * (depth + 2)
            for key in sorted(r.inputs) if r.custom else []:
                if key in r.secret_inputs:
                    lines.append(f"{pad}{key}: [secret]")
                else:
                    lines.extend(shown_lines(key, r.inputs[key], pad))
                    if key == "userData":
                        lines.append(f"{pad}  (in full: python -m infra render --stack {stack} --out DIR)")
            walk(r.urn, depth + 1)

    roots = {r.parent for r in run.resources} - {r.urn for r in run.resources}
    for root in sorted(roots):
        walk(root, 0)
    lines.append("outputs:")
    for name, value in run.outputs.items():
        lines += [f"  {name}: [secret]"] if name in run.secret_outputs else shown_lines(name, value, "  ")
    return lines


def zone_text(stack: str, overrides: dict[str, Any]) -> str:
    """The zone file, with the stand-in facts of an offline run (addresses, keys, SES tokens)."""
    from infra.core.dns import zone_file
    from infra.tools.rehearsal import run_program

    run = run_program(stack, overrides)
    facts = run.facts()
    header = (
        "; stand-in facts from an offline run: replace addresses, DKIM key and SES tokens with your stack's outputs\n"
    )
    return header + zone_file(run.settings, facts)


def deploy_key_pair() -> tuple[str, str]:
    """A fresh ed25519 key as the program's tls.PrivateKey gives it: (OpenSSH private, public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode().strip()


def render_to(stack: str, overrides: dict[str, Any], out: Path, generate_secrets: bool) -> list[Path]:
    """Write the user-data and every bundle file under OUT; placeholders stand for secrets.

    The user-data and the bundle's authorized_keys are the droplet's: the stack's SSH keys plus
    mailroom's deploy key, as the program adds it. With placeholders the deploy key is
    PLACEHOLDER_DEPLOY_KEY (a line sshd ignores); with generated secrets it is a fresh key, whose
    private half is written to OUT/deploy-key (mode 0600) so the render can be deployed by hand.
    """
    from infra.core.render import render_bundle
    from infra.core.user_data import render_user_data
    from infra.tools.stand_ins import generated_secrets, placeholder_secrets

    settings = parse_settings(stack_config(stack, overrides))
    secrets = generated_secrets() if generate_secrets else placeholder_secrets()
    from infra.core.dns import Facts

    written = []
    out.mkdir(parents=True, exist_ok=True)
    if generate_secrets:
        private_key, deploy_key = deploy_key_pair()
        target = out / "deploy-key"
        target.touch(mode=0o600)
        target.chmod(0o600)
        target.write_text(private_key)
        written.append(target)
    else:
        deploy_key = PLACEHOLDER_DEPLOY_KEY
    # As infra.cloud.program does: the deploy key joins the admin's keys in the user-data.
    with_deploy_key = dataclasses.replace(settings, ssh_public_keys=(*settings.ssh_public_keys, deploy_key))
    # Stand-in addresses (the droplet's are known once it exists): only the status check's expected records hold them.
    bundle = render_bundle(with_deploy_key, secrets, Facts.placeholder(settings))
    target = out / "user-data"
    target.write_text(render_user_data(with_deploy_key))
    written.append(target)
    for f in bundle.files:
        target = out / "bundle" / f.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.content)
        target.chmod(f.mode)
        written.append(target)
    # The bundle holds every secret file: readable by its owner only, from the first byte.
    target = out / "bundle.json"
    target.touch(mode=0o600)
    target.chmod(0o600)
    target.write_text(bundle.to_json())
    written.append(target)
    return written


def lab_command(action: str, stack: str, overrides: dict[str, Any]) -> int:
    """The lab: `pulumi up` rehearsed on a local Debian 12 host, real mail through it."""
    from infra.lab import deploy, network, state

    if action == "down":
        deploy.down()
        print("lab: down (namespaces, mounts and processes removed)")
        return 0
    if action == "status":
        if not (state.STATE_DIR / "lab.json").exists():
            print("lab: not running")
            return 1
        info = state.LabInfo.load()
        print(f"lab: up, stack {info.stack}, host {info.host}")
        return 0
    if action == "up":
        print(f"lab: deploying stack {stack} to a local Debian 12 host, as pulumi up would (cloud calls under mocks)")
        info = deploy.up(stack, overrides)
        for step in info.steps:
            print(f"  remote command {step['name']}: exit {step['exit']} in {step['seconds']} s")
    from infra.lab.mail import smoke

    info = state.LabInfo.load()
    for line in smoke(info):
        print(f"  {line}")
    print(
        f"lab: up. The server is {info.host} in network namespace {network.HOST_NS}; the outside world is "
        f"namespace {network.WORLD_NS}. Reach it with: ip netns exec {network.WORLD_NS} ssh -i {info.key_file} "
        f"{info.admin_user}@{info.host}  (mailbox passwords: {state.STATE_DIR / 'lab.json'}). "
        "Stop it with: python -m infra lab down"
    )
    return 0


def ssh_argv(args: argparse.Namespace, settings: Settings, outputs: dict[str, Any], key: Path | None) -> list[str]:
    """ssh to the server as the admin (or --ssh-user), before the remote command."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
    if key:
        ssh += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    if args.lab:  # a new lab host has a new host key: nothing to pin
        ssh += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    ssh.append(f"{args.ssh_user or settings.admin_user}@{outputs.get('ipv4', '')}")
    return ssh


def _age(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.0f} days"


def backup_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`backup run|list|restore`: the server's backup script, over SSH as the remote commands run."""
    from infra.core import backup
    from infra.tools import check

    settings = parse_settings(stack_config(args.stack, overrides))
    ssh_key = args.ssh_key
    if args.lab:
        from infra.lab import state

        info = state.LabInfo.load()
        settings = parse_settings(stack_config(info.stack, {**info.overrides, **overrides}))
        outputs = json.loads((state.STATE_DIR / "outputs.json").read_text())
        ssh_key = ssh_key or Path(info.key_file)
    else:
        outputs = check.stack_outputs(args.stack)
    if not backup.enabled(settings):
        print(f"error: the stack {args.stack} has no backup (backupTarget is none)", file=sys.stderr)
        return 2
    remote = ["sudo", "python3", backup.BACKUP_PATH, args.action]
    if args.action == "restore":
        remote += ["--snapshot", args.snapshot] + (["--mailbox", args.mailbox] if args.mailbox else [])
    argv = [*ssh_argv(args, settings, outputs, ssh_key), shlex.join(remote)]

    def call() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=6 * 3600)

    if args.lab:
        from infra.lab import network

        done = network.in_netns(network.WORLD_NS, call)
    else:
        done = call()
    if done.returncode != 0:
        print(f"error: {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)
        return 1
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "list":
        now, listed = time.time(), answer["snapshots"]
        print(
            f"{len(listed)} snapshot(s) in {backup.repository(settings)}, {answer['stored'] / 1e6:.1f} MB stored "
            "(compressed, deduplicated, encrypted), newest last:"
        )
        for snap in listed:
            taken = datetime.datetime.fromisoformat(str(snap["time"])[:26].rstrip("Z")).replace(tzinfo=datetime.UTC)
            print(
                f"  {snap['short_id']}  {taken:%Y-%m-%d %H:%M} UTC  {_age(now - taken.timestamp())} ago  "
                f"{snap['size'] / 1e6:.1f} MB"
            )
    elif args.action == "run":
        print(
            f"snapshot {answer.get('snapshot', '')[:8]}: {answer.get('files', 0)} files, "
            f"{answer.get('bytes', 0) / 1e6:.1f} MB, {answer.get('added', 0) / 1e6:.1f} MB new, verified"
        )
    else:
        for box in answer["mailboxes"]:
            print(f"{box['mailbox']}: " + ("restored" if box["restored"] else f"not restored ({box['why']})"))
        if "learning" in answer:
            print(f"spam filter learning: {answer['learning']}")
    return 0


def check_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`check`: the live domain against the stack; exit 0 ok, 1 warnings, 2 failures, 3 not run."""
    from infra.tools import check

    settings = parse_settings(stack_config(args.stack, overrides))
    resolver, ca_file, ssh_key = args.resolver, args.ca_file, args.ssh_key
    try:
        if args.lab:  # the lab's outputs, key, DNS and CA; run from its outside world
            from infra.lab import network, state, world

            info = state.LabInfo.load()
            settings = parse_settings(stack_config(info.stack, {**info.overrides, **overrides}))
            outputs = json.loads((state.STATE_DIR / "outputs.json").read_text())
            resolver = resolver or info.dns
            # What the lab host trusts: pebble's root (Let's Encrypt's stand-in) and the lab CA.
            roots = state.STATE_DIR / "check-roots.pem"
            roots.write_text("".join(p.read_text() for p in world.trusted_roots().values()))
            ca_file = ca_file or str(roots)
            ssh_key = ssh_key or Path(info.key_file)
        else:
            # What the stack holds encrypted, the stand-ins replaced: the real values, from the CLI.
            encrypted = encrypted_keys(args.stack)
            held = [k for k in check.SECRETS_USED if k in encrypted and k not in overrides]
            if held:
                real = {k: check.stack_secret(args.stack, k) for k in held}
                settings = parse_settings(stack_config(args.stack, {**overrides, **real}))
            outputs = json.loads(Path(args.outputs).read_text()) if args.outputs else check.stack_outputs(args.stack)
        ssh = [] if args.no_ssh else ssh_argv(args, settings, outputs, ssh_key)
        # The lab stands in for SES's SMTP endpoint, not its API: no call leaves for AWS from it.
        aws = not (args.no_aws or args.lab)
        target = check.Target.from_outputs(settings, outputs, resolver=resolver, ca_file=ca_file, ssh=ssh, aws=aws)
    except (check.CheckError, OSError, ValueError) as exc:
        print(f"error: the check could not start: {exc}", file=sys.stderr)
        return 3
    groups = args.only or list(check.GROUPS)
    if args.lab:
        results = network.in_netns(network.WORLD_NS, lambda: check.run(target, groups))
    else:
        results = check.run(target, groups)
    print(check.as_json(results) if args.json else check.status.report(results), end="\n" if args.json else "")
    code: int = check.status.exit_code(results)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("plan", "print the resources `pulumi up` would create, evaluated offline"),
        ("zone", "print the DNS records as a BIND zone file"),
        ("render", "write the user-data and the server bundle to a directory"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--stack", default="dev", help=f"stack name (one of: {', '.join(stack_names())})")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
        if name == "render":
            sub.add_argument("--out", type=Path, required=True, help="directory to write into")
            sub.add_argument(
                "--generate-secrets",
                action="store_true",
                help="fill secrets with freshly generated values (a real DKIM key...) instead of placeholders",
            )
    check_parser = commands.add_parser(
        "check",
        help="what is wrong with the live mail domain, in plain words with the fix (exit 0 ok, 1 warnings, 2 failures)",
        description="Check the deployed stack: DNS record by record, the addresses' PTRs, TLS on every port, "
        "blocklists, the relay's login and the server's inside (over SSH), and for SES its account and "
        "identity (with the AWS credentials of the environment, as `pulumi up` finds them; skipped without). "
        "Expected values come from the stack's settings and outputs; nothing is changed anywhere. "
        "Exit status: 0 all ok, 1 warnings, 2 failures, 3 the check could not start.",
    )
    check_parser.add_argument("--stack", default="dev", help=f"stack name (one of: {', '.join(stack_names())})")
    check_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    check_parser.add_argument("--resolver", metavar="IP", help="ask this DNS resolver (default: the system's)")
    check_parser.add_argument("--ca-file", metavar="PEM", help="trust these roots for TLS (default: the system's)")
    check_parser.add_argument("--ssh-user", help="log in to the server as this user (default: the adminUser setting)")
    check_parser.add_argument(
        "--ssh-key", type=Path, help="SSH private key for the server (default: your SSH agent and keys)"
    )
    check_parser.add_argument(
        "--no-ssh", action="store_true", help="skip the server's inside (relay login, daemons, queue...)"
    )
    check_parser.add_argument(
        "--no-aws", action="store_true", help="skip SES's account and identity (asked with your AWS credentials)"
    )
    check_parser.add_argument(
        "--outputs", type=Path, metavar="JSON", help="the stack's outputs as `pulumi stack output --json` prints them"
    )
    check_parser.add_argument("--lab", action="store_true", help="check the running lab (its outputs and its key)")
    check_parser.add_argument(
        "--only", action="append", choices=("dns", "addresses", "tls", "blocklists", "relay", "server"),
        help="only this group (repeatable)",
    )  # fmt: skip
    check_parser.add_argument("--json", action="store_true", help="print the results as JSON")
    backup_parser = commands.add_parser(
        "backup",
        help="the off-site backup: run one now, list the snapshots, restore mail (over SSH, as the admin)",
        description="run: back up now, as the nightly timer does. list: the snapshots with their age. restore: "
        "merge a snapshot's mail into the live server (every mailbox, or --mailbox), keeping mail that "
        "arrived since; folders, flags and UIDs come back as they were.",
    )
    backup_parser.add_argument("action", choices=("run", "list", "restore"))
    backup_parser.add_argument("--stack", default="dev", help=f"stack name (one of: {', '.join(stack_names())})")
    backup_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    backup_parser.add_argument("--snapshot", default="latest", help="restore: the snapshot's id (default: the newest)")
    backup_parser.add_argument("--mailbox", metavar="ADDRESS", help="restore: only this mailbox")
    backup_parser.add_argument("--ssh-user", help="log in to the server as this user (default: the adminUser setting)")
    backup_parser.add_argument("--ssh-key", type=Path, help="SSH private key for the server (default: your agent's)")
    backup_parser.add_argument("--lab", action="store_true", help="the running lab's server")
    backup_parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    lab = commands.add_parser("lab", help="the real mail stack on this machine: up, smoke, status, down")
    lab.add_argument("action", choices=("up", "smoke", "status", "down"))
    lab.add_argument("--stack", default="dev", help=f"stack name (one of: {', '.join(stack_names())})")
    lab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(item) for item in args.set)
        if args.command == "plan":
            print("\n".join(plan_lines(args.stack, overrides)))
        elif args.command == "zone":
            print(zone_text(args.stack, overrides), end="")
        elif args.command == "render":
            written = render_to(args.stack, overrides, args.out, args.generate_secrets)
            kind = "generated" if args.generate_secrets else "placeholders"
            print(f"wrote {len(written)} files under {args.out} (secrets are {kind})")
        elif args.command == "lab":
            return lab_command(args.action, args.stack, overrides)
        elif args.command == "check":
            return check_command(args, overrides)
        elif args.command == "backup":
            return backup_command(args, overrides)
    except (SettingsError, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the lab's failures: what failed and where to look
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

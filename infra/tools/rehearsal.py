"""The program run offline, under Pulumi's mocks: what `pulumi up` would declare, without a cloud.

`run_program(stack)` merges Pulumi.yaml defaults and Pulumi.<stack>.yaml the way the CLI does,
hands them to the program as the engine would (strings, secrets flagged), and records every
resource registration: type, name, parent, inputs (with which of them are secret) and the
resource options that the default mock monitor does not show (protect, retain_on_delete,
delete_before_replace, ignore_changes, replace_on_changes, additional_secret_outputs, depends_on),
and every provider function it calls (the zone lookup...) with its arguments. The cloud's answers
are stand-ins with realistic shapes: documentation addresses, generated keys, fake ids. Nothing is sent
anywhere. The plan command, the tests and the lab all use this one harness.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.config import set_all_config
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from infra.core.dns import Facts, dkim_public_key_body
from infra.core.settings import Settings, SettingsError, load_schema, parse_settings
from infra.core.stack import PROJECT, stack_config
from infra.core.steps import Step

SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"

# Deploy-time facts the mocks answer with: documentation addresses (RFC 5737, RFC 3849).
DROPLET_IPV4 = "203.0.113.10"
DROPLET_IPV6 = "2001:db8:10::10"
NAME_SERVERS = ["ada.ns.cloudflare.com", "bob.ns.cloudflare.com"]
ACCOUNT_ID = "123456789012"
DO_ACCOUNT_EMAIL = "owner@example.com"  # the DigitalOcean account's (verified) address


@dataclass
class Declared:
    """One resource as the program registered it."""

    urn: str
    id: str
    type: str
    name: str
    parent: str
    custom: bool
    inputs: dict[str, Any]
    secret_inputs: set[str]
    state: dict[str, Any] = field(default_factory=dict)
    protect: bool = False
    retain_on_delete: bool = False
    delete_before_replace: bool = False
    ignore_changes: list[str] = field(default_factory=list)
    replace_on_changes: list[str] = field(default_factory=list)
    additional_secret_outputs: list[str] = field(default_factory=list)
    dependencies: list[str] = field(default_factory=list)
    # The URNs of depends_on: what the resource waits for beyond the resources its inputs come from.
    depends_on: list[str] = field(default_factory=list)
    provider: str = ""


@dataclass(frozen=True)
class Invoked:
    """One provider function the program called (a data-source lookup), with its arguments."""

    token: str
    args: dict[str, Any]
    provider: str = ""


@dataclass
class OfflineRun:
    stack: str
    settings: Settings
    resources: list[Declared]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    invoked: list[Invoked] = field(default_factory=list)

    def invokes(self, token: str) -> list[Invoked]:
        """The calls of one provider function, e.g. cloudflare:index/getZone:getZone."""
        return [i for i in self.invoked if i.token == token]

    def of_type(self, type_: str) -> list[Declared]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str) -> Declared:
        found = self.of_type(type_)
        if len(found) != 1:
            raise LookupError(f"{len(found)} resources of type {type_}, expected one")
        return found[0]

    def facts(self) -> Facts:
        """The deploy-time facts as the stand-in cloud answered them (addresses, keys, tokens)."""
        droplet = self.one("digitalocean:index/droplet:Droplet")
        identities = self.of_type("aws:sesv2/emailIdentity:EmailIdentity")
        return Facts(
            droplet.state["ipv4Address"],
            droplet.state["ipv6Address"],
            dkim_public_key_body(self.named("dkim-key").state["publicKeyPem"]),
            tuple(t for r in identities for t in r.state["dkimSigningAttributes"]["tokens"]),
        )

    def named(self, name: str) -> Declared:
        for r in self.resources:
            if r.name == name:
                return r
        raise LookupError(name)


def _unwrap(value: Any, path: str, secret_paths: set[str]) -> Any:
    """Plain values from the wire form; records the paths of secret values."""
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            secret_paths.add(path)
            return _unwrap(value.get("value"), path, secret_paths)
        return {k: _unwrap(v, f"{path}.{k}" if path else k, secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    return value


def _top_level(paths: set[str]) -> set[str]:
    return {p.split(".")[0].split("[")[0] for p in paths}


def _pem_pair(algorithm: str, bits: int) -> dict[str, str]:
    if algorithm == "ED25519":
        key: Any = ed25519.Ed25519PrivateKey.generate()
        private_openssh = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        private_openssh = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
    public = key.public_key()
    return {
        "privateKeyPem": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        "privateKeyOpenssh": private_openssh,
        "publicKeyPem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "publicKeyOpenssh": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()
        + "\n",
    }


def _token(seed: str, length: int = 32) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


# Generated secrets, kept per resource for the life of the process: like Pulumi state, a second
# run of the same program gets the same keys and passwords, so unchanged inputs stay unchanged.
_GENERATED: dict[tuple[str, str], dict[str, str]] = {}


def _generated(kind: str, name: str, make: Callable[[], dict[str, str]]) -> dict[str, str]:
    if (kind, name) not in _GENERATED:
        _GENERATED[(kind, name)] = make()
    return _GENERATED[(kind, name)]


def generated_state() -> list[tuple[str, str, dict[str, str]]]:
    """The generated secrets as (resource type, name, values): what Pulumi's state would keep."""
    return [(kind, name, values) for (kind, name), values in _GENERATED.items()]


def restore_generated(state: Iterable[tuple[str, str, dict[str, str]]]) -> None:
    """Start from secrets generated earlier (a later `pulumi up` of the same stack)."""
    for kind, name, values in state:
        _GENERATED[(kind, name)] = values


class StandInCloud(pulumi_mocks.Mocks):
    """What the clouds would answer, with realistic shapes and stand-in values.

    Every provider function call (invoke) it answers is kept in `invoked`, in order.
    """

    def __init__(self) -> None:
        self.invoked: list[Invoked] = []

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        state = dict(args.inputs)
        resource_id = f"{args.name}-id"
        kind = args.typ
        if kind == "digitalocean:index/droplet:Droplet":
            resource_id = "400000001"
            state |= {
                "ipv4Address": DROPLET_IPV4,
                "ipv6Address": DROPLET_IPV6,
                "status": "active",
                "urn": "do:droplet:400000001",
            }
        elif kind == "digitalocean:index/volume:Volume":
            resource_id = "0b5f5d6e-0000-4000-8000-" + _token(args.name, 12)
        elif kind == "digitalocean:index/sshKey:SshKey":
            digest = hashlib.md5(str(args.inputs.get("publicKey", "")).encode(), usedforsecurity=False).hexdigest()
            state["fingerprint"] = ":".join(digest[i : i + 2] for i in range(0, 32, 2))
            resource_id = "41000" + str(len(args.name))
        elif kind == "tls:index/privateKey:PrivateKey":
            algorithm, bits = str(args.inputs.get("algorithm")), int(args.inputs.get("rsaBits", 2048))
            state |= _generated(kind, f"{args.name}/{algorithm}/{bits}", lambda: _pem_pair(algorithm, bits))
        elif kind == "aws:sesv2/emailIdentity:EmailIdentity":
            domain = args.inputs["emailIdentity"]
            tokens = [_token(f"{domain}-{i}") for i in range(3)]
            state |= {
                "arn": f"arn:aws:ses:us-east-1:{ACCOUNT_ID}:identity/{domain}",
                "dkimSigningAttributes": {**args.inputs.get("dkimSigningAttributes", {}), "tokens": tokens},
                "identityType": "DOMAIN",
            }
        elif kind == "aws:sesv2/configurationSet:ConfigurationSet":
            state["arn"] = f"arn:aws:ses:us-east-1:{ACCOUNT_ID}:configuration-set/{args.inputs['configurationSetName']}"
        elif kind == "aws:sns/topic:Topic":
            state["arn"] = f"arn:aws:sns:us-east-1:{ACCOUNT_ID}:{args.inputs.get('name', args.name)}"
        elif kind == "aws:iam/user:User":
            state["arn"] = f"arn:aws:iam::{ACCOUNT_ID}:user/{args.inputs.get('name')}"
        elif kind == "aws:iam/accessKey:AccessKey":
            resource_id = "AKIA" + _token(args.name, 16).upper()
            state |= _generated(
                kind,
                args.name,
                lambda: {"secret": secrets.token_urlsafe(30), "sesSmtpPasswordV4": "B" + secrets.token_urlsafe(32)},
            )
        elif kind == "digitalocean:index/spacesKey:SpacesKey":
            state |= _generated(
                kind,
                args.name,
                lambda: {"accessKey": "DO" + secrets.token_hex(9).upper(), "secretKey": secrets.token_urlsafe(32)},
            )
        elif kind == "cloudflare:index/apiToken:ApiToken":
            state |= _generated(kind, args.name, lambda: {"value": secrets.token_urlsafe(30)})
        elif kind == "random:index/randomPassword:RandomPassword":
            length = int(args.inputs.get("length", 24))
            state |= _generated(kind, f"{args.name}/{length}", lambda: {"result": secrets.token_hex(length)[:length]})
        elif kind == "command:remote:Command":
            state |= {"stdout": "", "stderr": ""}
        return resource_id, state

    def call(self, args: pulumi_mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        self.invoked.append(Invoked(args.token, dict(args.args), args.provider or ""))
        return self._answer(args), []

    def _answer(self, args: pulumi_mocks.MockCallArgs) -> dict[str, Any]:
        if args.token == "digitalocean:index/getAccount:getAccount":
            return {
                "email": DO_ACCOUNT_EMAIL,
                "emailVerified": True,
                "status": "active",
                "uuid": "a1b2c3d4-0000-4000-8000-000000000001",
                "dropletLimit": 10,
                "floatingIpLimit": 3,
                "id": "a1b2c3d4-0000-4000-8000-000000000001",
                "statusMessage": "",
            }
        if args.token == "cloudflare:index/getZone:getZone":
            name = args.args.get("filter", {}).get("name", "example.org")
            return {
                "id": "zone-" + _token(name, 24),
                "zoneId": "zone-" + _token(name, 24),
                "name": name,
                "nameServers": NAME_SERVERS,
            }
        if args.token == "cloudflare:index/getApiTokenPermissionGroupsList:getApiTokenPermissionGroupsList":
            group = {
                "id": "4755a26eedb94da69e1066d98aa820be",
                "name": "DNS Write",
                "category": "DNS",
                "isSelectable": True,
                "scopes": ["com.cloudflare.api.account.zone"],
            }
            return {"results": [group]}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {
                "accountId": ACCOUNT_ID,
                "arn": f"arn:aws:iam::{ACCOUNT_ID}:user/deployer",
                "userId": "AIDA000",
                "id": ACCOUNT_ID,
            }
        return {}


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The mock monitor, also keeping what the program asked for: options and secret inputs."""

    def __init__(self, mocks: pulumi_mocks.Mocks) -> None:
        super().__init__(mocks)
        self.declared: list[Declared] = []

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802 - the gRPC method's name
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type == "pulumi:pulumi:Stack":
            return response
        secret_paths: set[str] = set()
        inputs = _unwrap(json_format.MessageToDict(request.object), "", secret_paths)
        urn = response.urn
        if any(d.urn == urn for d in self.declared):
            raise AssertionError(f"two resources share the URN {urn}")
        self.declared.append(
            Declared(
                urn=urn,
                id=response.id,
                type=request.type,
                name=request.name,
                parent=request.parent,
                custom=request.custom,
                inputs=inputs,
                secret_inputs=_top_level(secret_paths),
                state=dict(self.resources[urn].state) if urn in self.resources else {},
                protect=bool(request.protect),
                retain_on_delete=bool(request.retainOnDelete),
                delete_before_replace=bool(request.deleteBeforeReplace),
                ignore_changes=list(request.ignoreChanges),
                replace_on_changes=list(request.replaceOnChanges),
                additional_secret_outputs=list(request.additionalSecretOutputs),
                dependencies=list(request.dependencies),
                depends_on=explicit_dependencies(request),
                provider=request.provider,
            )
        )
        return response


def explicit_dependencies(request: Any) -> list[str]:
    """REQUEST's dependencies that no input brought: the SDK sends depends_on and every input's
    resources together in `dependencies`, and the inputs' alone in `propertyDependencies`."""
    implicit = {urn for deps in request.propertyDependencies.values() for urn in deps.urns}
    return [urn for urn in request.dependencies if urn not in implicit]


def engine_config(raw: Mapping[str, Any]) -> dict[str, str]:
    """Settings as the engine hands them to a program: namespaced keys, JSON for non-strings."""
    return {f"{PROJECT}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


async def _resolve(value: Any) -> tuple[Any, bool]:
    output = pulumi.Output.from_input(value)
    return await output.future(), bool(await output.is_secret())


def _fresh_mocks(stack: str, config: Mapping[str, str], secret_keys: Iterable[str]) -> RecordingMonitor:
    """Config handed over as the engine does, and a fresh stack under mocks that record it all."""
    set_all_config(dict(config), list(secret_keys))
    runtime_settings.ROOT.set(None)  # a fresh stack per run
    monitor = RecordingMonitor(StandInCloud())
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    runtime_settings.SETTINGS.rpc_manager.clear()
    runtime_settings.SETTINGS.outputs.clear()
    return monitor


def _run(program_body: Callable[[], Any]) -> None:
    # As pulumi.runtime.test does: run the program, then wait for every registration it started.
    _sync_await(run_pulumi_func(lambda: _sync_await(program_body())))


def run_program(stack: str, overrides: Mapping[str, Any] | None = None) -> OfflineRun:
    """Evaluate the program for a stack under mocks and return everything it declared."""
    from infra.cloud import program

    raw = stack_config(stack, overrides)
    schema = load_schema()
    settings = parse_settings(raw, schema)  # refuse bad settings before anything is declared
    secret = [f"{PROJECT}:{k}" for k, spec in schema.items() if spec.secret and raw.get(k)]
    monitor = _fresh_mocks(stack, engine_config(raw), secret)
    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    async def evaluate() -> None:
        declared = program.build(program.settings_from_config())
        for name, value in declared.items():
            outputs[name], is_secret = await _resolve(value)
            if is_secret:
                secret_outputs.add(name)

    _run(evaluate)
    cloud = monitor.mocks
    invoked = list(cloud.invoked) if isinstance(cloud, StandInCloud) else []
    return OfflineRun(stack, settings, monitor.declared, outputs, secret_outputs, invoked)


@dataclass
class EntryRun:
    """What the program's real entry (`__main__.py`, as `pulumi up` runs it) did with a config."""

    resources: list[Declared]
    error: SettingsError | None


def run_entry(stack: str, config: Mapping[str, str], secret_keys: Iterable[str]) -> EntryRun:
    """Run `infra.cloud.program.main` under mocks, with the config exactly as the engine hands it over.

    `config` is namespaced and stringly typed ("mailroom:volumeSizeGb": "25"), `secret_keys` the
    namespaced keys the stack file holds encrypted. Nothing is validated here first: the entry
    itself must refuse bad settings, and `error` says how, with what was declared before it.
    """
    from infra.cloud import program

    monitor = _fresh_mocks(stack, config, secret_keys)

    async def evaluate() -> None:
        program.main()

    try:
        _run(evaluate)
    except SettingsError as exc:
        return EntryRun(monitor.declared, exc)
    return EntryRun(monitor.declared, None)


def remote_steps(run: OfflineRun) -> list[Step]:
    """The run's `command.remote.Command`s in dependency order (each after those it depends on)."""
    pending = {r.urn: r for r in run.of_type("command:remote:Command")}
    ordered: list[Step] = []
    while pending:
        ready = [r for r in pending.values() if not (set(r.dependencies) & set(pending))]
        if not ready:
            raise ValueError("the remote commands depend on each other in a cycle")
        for r in sorted(ready, key=lambda r: r.name):
            ordered.append(Step(r.name, r.inputs["create"], r.inputs.get("stdin"), r.inputs.get("delete")))
            del pending[r.urn]
    return ordered

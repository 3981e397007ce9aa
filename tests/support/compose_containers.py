"""Run deploy/docker-compose.yml's flywheel services as real containers (`make test-deploy`,
after deploy/test-deploy.sh built the image): a derived compose file with the substitutions a test
machine needs, as tests/test_deploy_run.py makes them (host names -> 127.0.0.1 ports, host
networking, PostgreSQL from Debian's binaries outside compose, the gateway's transformers backend
instead of vLLM, Slack -> the local Slack double, named volumes -> folders, the tiny model in the
models volume). Checks that the migration exits 0, the gateway gets ready and the bot connects to
Slack (the double) and answers its health check."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from flywheel.app.demo.slack_double import SlackDouble
from flywheel.modelfiles import default_embedder_dir, tiny_model_dir
from flywheel.net import free_port
from tests.support.postgres import PostgresServer
from tests.test_deploy_run import (
    DB_PASSWORD,
    DEPLOYED_UID,
    HOSTS,
    OPERATOR,
    SHORT,
    VLLM_ONLY,
    interpolate,
)

ROOT = Path(__file__).resolve().parents[2]


def derived(compose: dict, image: str, ports: dict[str, int], volumes: Path, db: str, slack_url: str) -> dict:
    out = {"services": {}}
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue  # postgres and vLLM: Docker Hub images (see the module's docstring)
        env = {k: interpolate(str(v), name) for k, v in svc.get("environment", {}).items() if k not in VLLM_ONLY}
        for key, value in env.items():
            for host, role in HOSTS.items():
                value = value.replace(f"@{host}:5432/flywheel", f"@127.0.0.1:{ports['postgres']}/{db}")
                value = value.replace(f"//{host}:8000", f"//127.0.0.1:{ports[role]}") if role == "gateway" else value
            env[key] = value
        env.update(SHORT.get(name, {}), SLACK_API_URL=slack_url)
        command = list(svc["command"])
        if "--port" in command:
            command[command.index("--host") + 1] = "127.0.0.1"
            command[command.index("--port") + 1] = str(ports[name])
        mounts = []
        for volume in svc.get("volumes", []):
            source, path, *mode = volume.split(":")
            mounts.append(f"{volumes / source}:{path}{':ro' if mode == ['ro'] else ''}")
        out["services"][name] = {"image": image, "command": command, "environment": env, "volumes": mounts,
                                 "network_mode": "host", "user": svc.get("user", f"{DEPLOYED_UID}:{DEPLOYED_UID}")}
    return out


def wait(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{what} not ready at {url} after {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    work = args.work / "compose"
    shutil.rmtree(work, ignore_errors=True)
    volumes = work / "volumes"
    for name in ("models", "adapters", "trainer-work"):
        (volumes / name).mkdir(parents=True)
    shutil.copytree(tiny_model_dir(), volumes / "models" / "smollm2-135m-instruct")
    shutil.copytree(default_embedder_dir(), volumes / "models" / "all-minilm-l6-v2")
    subprocess.run(["chown", "-R", f"{DEPLOYED_UID}:{DEPLOYED_UID}", str(volumes)], check=True)
    pg = PostgresServer().start()
    double = SlackDouble(bot_token=OPERATOR["SLACK_BOT_TOKEN"], app_token=OPERATOR["SLACK_APP_TOKEN"]).start()
    project = ["docker-compose", "-p", "flywheel-test", "-f", str(work / "compose.yml")]
    try:
        import psycopg

        db = f"flywheel_{os.urandom(4).hex()}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE flywheel LOGIN PASSWORD '{DB_PASSWORD}'")
            conn.execute(f'CREATE DATABASE "{db}" OWNER flywheel')
        ports = {"postgres": pg.port, "gateway": free_port(), "bot": free_port()}
        compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
        (work / "compose.yml").write_text(yaml.safe_dump(derived(compose, args.image, ports, volumes, db,
                                                                 double.api_url)))
        subprocess.run([*project, "run", "--rm", "migrate"], check=True)
        subprocess.run([*project, "up", "-d", "gateway", "bot"], check=True)
        wait(f"http://127.0.0.1:{ports['gateway']}/readyz", 600, "the gateway")
        wait(f"http://127.0.0.1:{ports['bot']}/healthz", 300, "the bot")
        double.socket_mode.wait_connected(1)
        print("compose services in containers: migrated, gateway ready, bot connected to Slack", flush=True)
        return 0
    finally:
        subprocess.run([*project, "logs", "--tail", "30"], check=False)
        subprocess.run([*project, "down", "-v"], check=False)
        double.stop()
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())

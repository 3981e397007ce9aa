"""The demo's week, played end to end (`flywheel demo run`): real gateway, bot and trainer as
processes, Slack as the local double, a scripted team; the phases of `run_demo` in order.

Imported only when a demo runs: the store, bot and trainer modules it needs add about a second
to every `flywheel` command's start."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import typer

from flywheel.app.demo.processes import Service, ServiceError, free_port, run_flywheel
from flywheel.app.demo.script import (ask_bot, ask_model, check_citations, imported_sections, load_facts,
                                      make_rows, memory_size, play_week, production_version, ran,
                                      render_table, sample_recheck, summarize, wait_for_memory,
                                      wait_for_production, write_results)
from flywheel.app.demo.slack_double import SlackDouble, SlackSender
from flywheel.app.demo.workspace import Workspace
from gateway.vllm_server import VLLMServer
from store.db import session_scope
from store.versions import list_versions

SIGNING_SECRET = "demo-signing-secret"
BOT_TOKEN = "xoxb-demo-token"
ADMIN = "UADMIN01"
ADMIN_CHANNEL = "CADMIN001"


@dataclass
class DemoConfig:
    output: Path = Path("demo-output")
    model_dir: Path = Path("models/smollm2-135m-instruct")
    embed_dir: Path = field(default_factory=lambda: Path(os.environ.get("FLYWHEEL_EMBED_MODEL",
                                                                        "models/all-minilm-l6-v2")))
    backend: str = "transformers"
    facts: int | None = None  # first N facts (None: all)
    facts_file: Path | None = None  # JSONL {"question", "answer", "paraphrases"}; None: the bundled company
    paraphrases: int = 2
    recheck: int | None = None  # facts asked through the bot again after the week (None: all)
    docs: Path | None = None  # the team's documents, imported before the week (the docs phase)
    until: str | None = None  # "docs": stop after the docs phase; None: the whole week
    max_tokens: int = 40
    trainer_env: dict = field(default_factory=dict)  # the trainer's defaults fit the data size
    quiet_slack: bool = False


def demo_env(cfg: DemoConfig, gateway_url: str, slack_api_url: str, vllm_url: str | None) -> dict[str, str]:
    out = cfg.output.resolve()
    env = {
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{out / 'flywheel.db'}",
        "FLYWHEEL_BASE_MODEL": str(cfg.model_dir.resolve()),
        "FLYWHEEL_ADAPTERS_DIR": str(out / "adapters"),
        "FLYWHEEL_RUNS_DIR": str(out / "runs"),
        "FLYWHEEL_DATA_DIR": str(out / "data"),
        "FLYWHEEL_BACKEND": cfg.backend,
        "FLYWHEEL_ADMIN_TOKEN": "demo-admin-token",
        "FLYWHEEL_GATEWAY_ADMIN_TOKEN": "demo-admin-token",
        "FLYWHEEL_GATEWAY_URL": gateway_url,
        "FLYWHEEL_SYNC_INTERVAL_S": "1",
        "FLYWHEEL_MAX_TOKENS": str(cfg.max_tokens),
        "FLYWHEEL_MAX_NEW_TOKENS": str(cfg.max_tokens),  # the gateway's cap
        "FLYWHEEL_EVAL_MAX_NEW_TOKENS": str(cfg.max_tokens),  # the trainer evaluates answers as long
        "FLYWHEEL_TEMPERATURE": "0",
        "FLYWHEEL_ADMINS": ADMIN,
        "FLYWHEEL_ADMIN_CHANNEL": ADMIN_CHANNEL,
        "FLYWHEEL_BOT_USER_ID": "UBOT0001",
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack_api_url,
        "SLACK_APP_TOKEN": "",
        "FLYWHEEL_EMBED_MODEL": str(cfg.embed_dir.resolve()),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **cfg.trainer_env,
    }
    if vllm_url:
        env["FLYWHEEL_VLLM_URLS"] = vllm_url
    return env


def run_demo(cfg: DemoConfig, say=typer.echo) -> dict:
    """Play the loop end to end; returns the summary (also written under cfg.output)."""
    laps = _Laps()
    if cfg.output.exists():
        shutil.rmtree(cfg.output)
    cfg.output.mkdir(parents=True)
    facts, general = load_facts(cfg.facts, cfg.facts_file)
    rows = make_rows(facts, general, cfg.paraphrases)
    rechecked = sample_recheck(rows, cfg.recheck)
    again = "" if len(rechecked) == len(rows) else f" ({len(rechecked)} of {len(rows)}: {cfg.recheck} facts sampled)"
    with ExitStack() as running:  # on the way out, in reverse: the services, vLLM, the double, the environment
        running.callback(_restore_environ, dict(os.environ))
        slack = SlackDouble(bot_token=BOT_TOKEN, printer=None if cfg.quiet_slack else _admin_channel_printer(say))
        running.callback(slack.start().stop)
        env, gateway_url, bot_url = _start_services(cfg, slack, say, running)
        ws = Workspace(SlackSender(f"{bot_url}/slack/events", SIGNING_SECRET, double=slack), slack, admin=ADMIN)
        _ask_base_model(cfg, rechecked, say)
        laps.mark("before")
        if cfg.docs is not None:
            _ask_with_docs(cfg, env, ws, rechecked, again, say)
            laps.mark("docs")
            if cfg.until == "docs":
                return _results(cfg, rows, rechecked, slack, laps, say)
        corrections = _play_week(ws, rows, say)
        laps.mark("week")
        _ask_with_memory(ws, rechecked, corrections, again, say)
        laps.mark("memory")
        _train(env, say)
        laps.mark("train")
        version = _gated_version(slack, say)
        swap_s = _promote(ws, gateway_url, version, say)
        say(f"\n▶ Friday afternoon: the same questions again through the bot (adapter + memory){again}")
        ask_bot(ws, rechecked, "after", say)
        laps.mark("after")
        say("\n▶ And once more from the adapter alone (memory off, same prompt)")
        ask_model(rechecked, cfg.model_dir, say, cfg.max_tokens, adapter=version["adapter_path"], phase="lora_only")
        laps.mark("lora_only")
        return _results(cfg, rows, rechecked, slack, laps, say, version=version, swap_s=swap_s,
                        corrections=corrections)


class _Laps:
    """Seconds each phase took, each from the end of the one before, and in all."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.laps: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.laps[phase], self.last = round(now - self.last, 1), now

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total": round(self.last - self.started, 1)}


def _restore_environ(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


def _start_services(cfg: DemoConfig, slack: SlackDouble, say, running: ExitStack) -> tuple[dict[str, str], str, str]:
    """vLLM (for that backend), the store's schema, then the gateway and the bot as processes, each
    ready before the next and stopped by `running` on the way out; the environment they share,
    the gateway's URL and the bot's."""
    vllm_url = None
    if cfg.backend == "vllm":
        say("▶ Starting the vLLM CPU server (about a minute)…")
        vllm = VLLMServer(cfg.model_dir, served_name="base").start()
        running.callback(vllm.stop)
        vllm_url = vllm.url
    gw_port, bot_port = free_port(), free_port()
    gateway_url, bot_url = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{bot_port}"
    env = demo_env(cfg, gateway_url, slack.api_url, vllm_url)
    os.environ.update(env)  # this process reads the same store
    say(f"▶ Database {env['FLYWHEEL_DATABASE_URL']}")
    logs = cfg.output / "logs"
    if run_flywheel(["db", "upgrade"], env, logs / "db.log", echo=False) != 0:
        raise ServiceError(f"`flywheel db upgrade` failed; see {logs / 'db.log'}")
    gateway = Service("gateway", ["gateway", "serve", "--host", "127.0.0.1", "--port", str(gw_port)], env,
                      logs / "gateway.log", ready_url=f"{gateway_url}/readyz")
    bot = Service("bot", ["bot", "serve", "--host", "127.0.0.1", "--port", str(bot_port)], env,
                  logs / "bot.log", ready_url=f"{bot_url}/healthz")
    for svc in (gateway, bot):
        say(f"▶ Starting the {svc.name} ({cfg.backend if svc is gateway else 'HTTP Events API'}; log {svc.log_path})")
        running.callback(svc.start().stop)
        svc.wait_ready(progress=say)
    return env, gateway_url, bot_url


def _ask_base_model(cfg: DemoConfig, rechecked: list, say) -> None:
    say(f"\n▶ Monday morning: the base model's answers to all {len(rechecked)} questions (taught ones, "
        f"{cfg.paraphrases} paraphrase(s) each nobody teaches, general ones), for comparison")
    ask_model(rechecked, cfg.model_dir, say, cfg.max_tokens)


def _ask_with_docs(cfg: DemoConfig, env: dict[str, str], ws: Workspace, rechecked: list, again: str, say) -> None:
    """The cold start: the admin imports the team's documents with `flywheel docs import`; every
    question through the bot before anyone corrected anything, each answer's citation checked
    against the sections it names."""
    say(f"\n▶ Monday, first thing: the admin imports the team's documents (`flywheel docs import {cfg.docs}`)")
    if run_flywheel(["docs", "import", str(cfg.docs.resolve())], env) != 0:
        raise ServiceError("`flywheel docs import` failed (see above)")
    sections = imported_sections()
    count = sum(map(len, sections.values()))
    wait_for_memory(count)
    say(f"  {count} sections are in the memory")
    say(f"\n▶ Monday: every question through the bot with only the documents to go on{again}")
    ask_bot(ws, rechecked, "docs", say)
    check_citations(rechecked, sections)


def _play_week(ws: Workspace, rows: list, say) -> int:
    """Monday to Thursday noon: the team asks, votes and corrects; the admin approves the
    corrections, which then reach the memory (beside what it held: imported sections). How
    many corrections there were."""
    asked = sum(r.kind == "asked" for r in rows)
    held = memory_size()
    say(f"\n▶ Monday–Thursday: the team asks {asked} questions; 👍 good answers, 👎 and correct bad ones")
    corrections = play_week(ws, rows, say)
    say(f"\n▶ Thursday noon: the admin reviews the {corrections} corrections in {ADMIN_CHANNEL} "
        "and approves them (corrections from non-admins wait for a reviewer)")
    approved = ws.approve_corrections(ADMIN_CHANNEL, corrections)
    say(f"  {approved} approved")
    wait_for_memory(held + corrections)
    return corrections


def _ask_with_memory(ws: Workspace, rechecked: list, corrections: int, again: str, say) -> None:
    say(f"\n▶ Thursday afternoon: the {corrections} corrections are in the memory; the same and "
        f"paraphrased questions again{again}, no retrain yet")
    ask_bot(ws, rechecked, "memory", say)


def _train(env: dict[str, str], say) -> None:
    say("\n▶ Thursday night: the trainer builds the dataset and fine-tunes a LoRA adapter (CPU)")
    if run_flywheel(["train", "run"], env) != 0:
        raise ServiceError("`flywheel train run` failed (see above)")


def _gated_version(slack: SlackDouble, say) -> dict:
    """The version the training run registered, once its report reached the admins; it must have
    passed the gate."""
    report = slack.wait_for("files.completeUploadExternal", timeout=120)
    say(f"  the report with its plot reached {ADMIN_CHANNEL} ({len(report)} upload)")
    version = _latest_version()
    if version is None or not version["gate_passed"]:
        reasons = "; ".join(version["gate_reasons"]) if version else "no version registered"
        raise ServiceError(f"the candidate did not pass the gate: {reasons}")
    return version


def _promote(ws: Workspace, gateway_url: str, version: dict, say) -> float:
    """The admin's `/flywheel promote`; seconds until the gateway served the version."""
    say(f"\n▶ Friday: the admin promotes {version['name']} with `/flywheel promote {version['name']}`")
    ws.command(f"promote {version['name']}", user=ADMIN)
    swap_s = wait_for_production(gateway_url, version["name"])
    if production_version() != version["name"]:
        raise ServiceError("the production alias did not move")
    say(f"  the gateway serves {version['name']} as production {swap_s:.1f} s after the command")
    return swap_s


_SAID = {"before": "base", "docs": "docs", "memory": "memory", "after": "adapter+memory"}  # lora_only: in brackets


def _results(cfg: DemoConfig, rows: list, rechecked: list, slack: SlackDouble, laps: _Laps, say, *,
             version: dict | None = None, swap_s: float | None = None, corrections: int | None = None) -> dict:
    """The summary, written under cfg.output with the report and shown as a table; version,
    swap_s and corrections are None when the demo stopped after the docs phase."""
    summary = summarize(rows)
    if slack.refused:  # the bot sent something Slack would answer with invalid_blocks
        say(f"\n⚠ Slack would have refused {len(slack.refused)} payload(s): {slack.refused[:3]}")
    extra = {"version": version, "swap_s": None if swap_s is None else round(swap_s, 2),
             "facts_file": str(cfg.facts_file or "bundled"), "docs": None if cfg.docs is None else str(cfg.docs),
             "until": cfg.until, "paraphrases": cfg.paraphrases, "corrections": corrections,
             "rechecked_rows": len(rechecked), "refused_by_slack": slack.refused,
             "timings_s": laps.timings()}
    write_results(cfg.output, rows, extra)
    if version is not None:
        _copy_report(version, cfg.output)
    say("\n" + render_table(rechecked))
    phases = ran(rechecked)
    for kind in ("asked", "paraphrase", "general"):
        m = summary[kind]
        chain = " → ".join(f"{_SAID[p]} {m[p + '_f1']}" for p in phases if p in _SAID)
        alone = f" (adapter alone {m['lora_only_f1']})" if "lora_only" in phases else ""
        cited = m.get("docs_cite_ok")
        cites = "" if cited is None else f"; docs answers citing a section that holds the answer: {cited:.0%}"
        say(f"mean token F1, {kind} (n={m['n']}): {chain}{alone}{cites}")
    say(f"report, plot and tables in {cfg.output}/ ({extra['timings_s']['total']:.0f} s in all)")
    return {"summary": summary, "rows": rows, **extra}


def _latest_version() -> dict | None:
    with session_scope() as session:
        versions = list_versions(session, limit=1)
        if not versions:
            return None
        v = versions[0]
        return {"name": v.name, "gate_passed": v.gate_passed, "gate_reasons": v.gate_reasons,
                "report_path": v.report_path, "adapter_path": v.adapter_path}


def _copy_report(version: dict, out: Path) -> None:
    plot = Path(version.get("report_path") or "")
    for path in (plot, plot.with_suffix(".json")):
        if path.is_file():
            shutil.copy(path, out / f"report{path.suffix}")


def _admin_channel_printer(say):
    """Show what the bot posts to admins (the report); answers in #general are summarized by the script."""
    shown = {"review": 0}

    def printer(text: str) -> None:
        if "*Correction by" in text:  # one per correction: show the first, the script counts the rest
            shown["review"] += 1
            if shown["review"] > 1:
                return
        if ADMIN_CHANNEL in text.split("\n", 1)[0] or "file shared" in text:
            say(text)
    return printer

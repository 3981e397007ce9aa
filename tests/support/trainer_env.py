"""A tiny trainer for tests that run whole cycles: the settings (as environment, the way the CLI
and `train watch` read them) and a handful of imported facts to train on."""
from __future__ import annotations

from pathlib import Path


def tiny_trainer_env(monkeypatch, *, database_url: str, model_dir: Path, work: Path, **extra: str) -> None:
    """Two steps of LoRA r4 on the tiny model, no augmentation; `extra` adds or overrides."""
    values = {"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_BASE_MODEL": str(model_dir),
              "FLYWHEEL_ADAPTERS_DIR": str(work / "adapters"), "FLYWHEEL_RUNS_DIR": str(work / "runs"),
              "FLYWHEEL_DATA_DIR": str(work / "data"), "FLYWHEEL_MAX_STEPS": "2", "FLYWHEEL_BATCH_SIZE": "4",
              "FLYWHEEL_LORA_R": "4", "FLYWHEEL_LORA_ALPHA": "8", "FLYWHEEL_EVAL_MAX_NEW_TOKENS": "4",
              "FLYWHEEL_AUGMENT_TEMPLATES": "0", "FLYWHEEL_RECALL_PARAPHRASES": "0", **extra}
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def import_facts(url: str, numbers=range(6)) -> None:
    """'What is fact number i?' → 'Fact i is 7i.' as imported examples."""
    from store.db import get_engine, session_scope
    from store.examples import upsert_example

    with session_scope(get_engine(url)) as s:
        for i in numbers:
            upsert_example(s, messages=[{"role": "user", "content": f"What is fact number {i}?"}],
                           answer=f"Fact {i} is {i * 7}.", source="import", provenance={"row": i})


def ended_run(url: str, run_id: int):
    """The run once it has ended (succeeded, failed or cancelled), else None: for wait_until."""
    from store.db import get_engine, session_scope
    from store.runs import get_run

    with session_scope(get_engine(url)) as s:
        run = get_run(s, run_id)
        return run if run.status in ("succeeded", "failed", "cancelled") else None

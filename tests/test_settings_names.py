"""One environment variable, one meaning: a name read by two settings classes must mean the same
thing in both (same type family and default), or tuning one service silently changes another
(FLYWHEEL_MAX_NEW_TOKENS was the gateway's serving cap and the trainer's evaluation length)."""
from __future__ import annotations

import importlib
from collections import defaultdict

from pydantic import AliasChoices

SETTINGS = {"bot.settings": "BotSettings", "gateway.settings": "GatewaySettings",
            "trainer.settings": "TrainerSettings", "flywheel.memory": "MemorySettings",
            "flywheel.prompt": "PromptSettings", "trainer.docsource": "DocumentSettings", "store.settings": None}
# Shared on purpose, one meaning; their defaults differ only where stated.
SAME_MEANING_DIFFERENT_DEFAULT = {
    "FLYWHEEL_GATEWAY_URL": "the gateway; the bot assumes a local one, the trainer only uses it for paraphrases",
}


def _classes():
    from pydantic_settings import BaseSettings

    for module_name, name in SETTINGS.items():
        module = importlib.import_module(module_name)
        if name is not None:
            yield getattr(module, name)
            continue
        yield from (v for v in vars(module).values()
                    if isinstance(v, type) and issubclass(v, BaseSettings) and v is not BaseSettings)


def env_names() -> dict[str, list[tuple[str, object, object]]]:
    seen = defaultdict(list)
    for cls in _classes():
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            names = {a.upper() for a in alias.choices} if isinstance(alias, AliasChoices) else {(prefix + name).upper()}
            for env in names:
                seen[env].append((cls.__name__, field.annotation, field.default))
    return seen


def _kind(annotation) -> str:
    """str, Path and optional ones are one kind here: what differs is the meaning, not the parsing."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("Path", "str").replace(" | None", "").replace("Optional[", "").rstrip("]")


def test_a_shared_environment_name_means_one_thing():
    clashes = []
    for env, readers in env_names().items():
        owners = {cls for cls, _t, _d in readers}
        if len(owners) < 2:
            continue
        (_c1, t1, d1), *rest = readers
        for _c2, t2, d2 in rest:
            if _kind(t1) != _kind(t2) or (str(d1) != str(d2) and env not in SAME_MEANING_DIFFERENT_DEFAULT):
                clashes.append(f"{env}: {readers}")
    assert not clashes, "\n".join(clashes)

"""Paraphrase augmentation (the seed's data-augmentation step), two kinds:
- rule templates (on by default, no model needed): a taught question wrapped and recased the
  ways people ask in chat. Two disjoint families: TRAIN phrasings are learned, RECALL phrasings
  are held out to measure whether a taught fact is recalled when asked differently.
- model paraphrases (optional): new phrasings generated through the gateway's OpenAI-compatible
  API, stored as examples marked "augmented" and only ever used in the train split."""
from __future__ import annotations

import hashlib
import re

import httpx
from sqlmodel import Session

from flywheel.embedding import EmbedderError, load_embedder
from flywheel.logs import get_logger
from flywheel.memory import MemorySettings
from store.examples import list_examples, mark_paraphrased, upsert_example

log = get_logger("trainer.augment")
# A few worked examples: SmolLM2-135M asked without them mostly answers, chats or repeats the
# instruction (measured: about 1 line in 10 was a question); with them most lines are. The answer
# is shown too, so the new questions also use its words ("Who handles payroll?" for "Payroll
# questions go to Aino"): people ask in the words of the answer they expect.
SYSTEM = ("You write other questions that the given answer replies to. One question per line, worded "
          "differently from the original question. Do not answer.")
SHOTS = (
    ("Where is the nearest train station?", "The closest station is Central, a five-minute walk.",
     ("Which train station is closest?", "How far is the walk to the station?")),
    ("Who approves expense reports?", "Expense reports are approved by your team lead.",
     ("Who signs off on expense claims?", "Whose approval do my expenses need?")),
    ("What time does the gym open?", "The gym opens at 6 am on weekdays.",
     ("When does the gym open in the morning?", "At what hour can I get into the gym on weekdays?")),
)
_PREFIX = re.compile(r"^\s*(?:\d+[.)]|[-*•]|(?:question|rewrite|rewritten|paraphrase)\s*\d*\s*:)\s*", re.I)


_QUESTION_WORDS = {"what", "who", "whom", "whose", "where", "when", "which", "how", "why", "is", "are", "was",
                   "were", "do", "does", "did", "can", "could", "should", "will", "would", "may", "has",
                   "have", "am"}
TRAIN_TEMPLATES = (
    "Can you tell me {lower}",
    "Quick question: {q}",
    "{casual}",
    "Hey, {lower}",
    "Do you know {lower}",
    "I'd like to know {lower}",
)
RECALL_TEMPLATES = (
    "Could someone remind me: {lower}",
    "{bare}? I can't remember.",
    "any idea {casual}?",
)


def _forms(question: str) -> dict[str, str]:
    q = " ".join(question.split())
    bare = q.rstrip(" ?.!")
    first = bare.split(" ", 1)[0]
    lower = (q[0].lower() + q[1:]) if first.lower() in _QUESTION_WORDS else q
    return {"q": q if q.endswith("?") else bare + "?", "lower": lower if lower.endswith("?") else lower.rstrip(" .!") + "?",
            "bare": bare, "casual": bare.lower()}


def template_paraphrases(question: str, n: int, family: str = "train") -> list[str]:
    """Up to n rule paraphrases of a question from one family, picked by the question's hash so
    items get different phrasings (deterministic: same question, same paraphrases)."""
    templates = TRAIN_TEMPLATES if family == "train" else RECALL_TEMPLATES
    if n <= 0 or not question.strip():
        return []
    forms = _forms(question)
    start = int.from_bytes(hashlib.sha256(forms["q"].encode()).digest()[:4], "big") % len(templates)
    out, seen = [], {forms["q"].lower()}
    for i in range(len(templates)):
        text = templates[(start + i) % len(templates)].format(**forms)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
        if len(out) == n:
            break
    return out


class AugmentError(RuntimeError):
    """The gateway could not be reached or answered badly."""


def paraphrase_messages(question: str, answer: str, n: int) -> list[dict]:
    def ask(q: str, a: str, k: int) -> dict:
        return {"role": "user", "content": f"Question: {q}\nAnswer: {a}\nWrite {k} other questions this answer replies to."}

    messages = [{"role": "system", "content": SYSTEM}]
    for shot, shot_answer, alts in SHOTS:
        messages += [ask(shot, shot_answer, len(alts)), {"role": "assistant", "content": "\n".join(alts)}]
    return [*messages, ask(question, answer, n)]


def _words(text: str) -> list[str]:
    return [w.removesuffix("'s") for w in re.findall(r"[\w'-]+", text)]


def _names(question: str) -> set[str]:
    """Capitalized words past the first (Lumenfold, Sunmule, Wi-Fi): a rewording keeps them."""
    return {w.lower() for w in _words(question)[1:] if w[:1].isupper() and w != "I"}


def candidate_lines(question: str, text: str) -> list[str]:
    """The distinct lines of a model's reply that could be rewordings: questions that keep the
    question's names; list markers and labels stripped; the question itself, statements, echoes
    of the instruction and 2-word scraps dropped."""
    seen, out = {" ".join(question.lower().split())}, []
    names = _names(question)
    for line in text.splitlines():
        line = _PREFIX.sub("", line).strip().strip('"\'“”').strip()
        key = " ".join(line.lower().split())
        words = {w.lower() for w in _words(key)}
        if (len(words) < 3 or key in seen or not key.endswith("?") or key.startswith("rewrite this question")
                or not names <= words):
            continue
        seen.add(key)
        out.append(line)
    return out


def keep_own(questions: list[str], candidates: list[list[str]], embedder, min_similarity: float) -> list[list[str]]:
    """For each taught question, its candidates that stay near it (cosine of sentence embeddings
    ≥ min_similarity) and are nearer to it than to any other taught question. A small model
    drifts ("Who founded Lumenfold?" written for the headquarters' answer), and a drifted line
    would teach one fact's answer to another fact's question."""
    flat = [c for group in candidates for c in group]
    if not flat or embedder is None or min_similarity <= 0:
        return candidates
    vectors = embedder.embed([*questions, *flat])
    scores = vectors[len(questions):] @ vectors[:len(questions)].T  # candidate × taught question
    out, row = [], 0
    for own, group in enumerate(candidates):
        kept = []
        for c in group:
            if scores[row, own] >= min_similarity and scores[row].argmax() == own:
                kept.append(c)
            row += 1
        out.append(kept)
    return out


def gateway_client(url: str, api_key: str | None) -> httpx.Client:
    """An HTTP client for the gateway's OpenAI-compatible API (a CPU model may take a minute)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60.0)


def complete(client: httpx.Client, body: dict) -> str:
    """The text of one chat completion through the gateway (`client`: its base URL and key);
    AugmentError when the gateway refuses or answers something that is not a completion."""
    resp = client.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise AugmentError(f"gateway answered {resp.status_code}: {resp.text[:200]}")
    try:
        return str(resp.json()["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AugmentError(f"gateway answered no completion: {resp.text[:200]}") from exc


def paraphrase(client: httpx.Client, question: str, answer: str, n: int, model: str) -> list[str]:
    """Up to n + 1 candidate questions for one taught answer (one spare: some get filtered)."""
    body = {"model": model, "temperature": 0.7, "top_p": 0.9, "max_tokens": 24 * (n + 1),
            "messages": paraphrase_messages(question, answer, n + 1)}
    return candidate_lines(question, complete(client, body))


def _embedder():
    """The memory's sentence embedder, or None where it is not installed (the filter is then off)."""
    try:
        return load_embedder(MemorySettings().embed_model)
    except EmbedderError as exc:
        log.warning("paraphrase filter off", reason=str(exc))
        return None


def augment_examples(session: Session, settings) -> int:
    """Ask for new questions to each taught answer once (corrections, imports, shortcuts; an item
    already sent is not sent again), keep those that stay with their own fact, store them as
    augmented examples. Best effort: without a gateway, or when it fails, training goes on with
    the rule templates alone and the items left are tried again next time."""
    from trainer.dataset import TAUGHT_SOURCES  # trainer.dataset imports this module: not at the top

    if not settings.gateway_url:
        log.info("model paraphrases skipped", reason="no FLYWHEEL_GATEWAY_URL")
        return 0
    rows = list_examples(session, everyone_may_see=True)  # private items are never sent, never trained
    taught = [ex for ex in rows if ex.source in TAUGHT_SOURCES and ex.answer is not None and ex.label is None]
    done = {ex.provenance.get("augmented_from") for ex in rows if ex.source == "augmented"}
    todo = [ex for ex in taught if ex.id not in done and "paraphrased" not in ex.provenance]
    if not todo:
        return 0
    asked: list[tuple] = []
    with gateway_client(settings.gateway_url, settings.gateway_api_key) as client:
        for i, ex in enumerate(todo):
            question, found, seen = ex.messages[-1]["content"], [], set()
            try:
                for _attempt in range(settings.augment_attempts):  # sampled: each attempt words it anew
                    for line in paraphrase(client, question, ex.answer, settings.augment_paraphrases,
                                           settings.augment_model):
                        if line.lower() not in seen:
                            seen.add(line.lower())
                            found.append(line)
            except (AugmentError, httpx.HTTPError) as exc:
                log.warning("model paraphrases stopped", done=i, left=len(todo) - i, error=str(exc)[:200])
                break
            asked.append((ex, found))
            if (i + 1) % 10 == 0:
                log.info("paraphrasing", done=i + 1, of=len(todo))
    if not asked:
        return 0
    # every taught question competes, so a candidate nearer to another fact is dropped
    questions = [ex.messages[-1]["content"] for ex, _c in asked]
    sent = {ex.id for ex, _c in asked}
    others = [ex.messages[-1]["content"] for ex in taught if ex.id not in sent]
    embedder = _embedder() if settings.augment_min_similarity > 0 else None
    kept = keep_own([*questions, *others], [c for _e, c in asked] + [[] for _ in others], embedder,
                    settings.augment_min_similarity)
    created, marks = 0, {}
    for (ex, _candidates), alts in zip(asked, kept):
        for alt in alts[:settings.augment_paraphrases]:
            _row, new = upsert_example(session, messages=[*ex.messages[:-1], {"role": "user", "content": alt}],
                                       answer=ex.answer, source="augmented", provenance={"augmented_from": ex.id})
            created += new
        marks[ex.id] = len(alts[:settings.augment_paraphrases])
    mark_paraphrased(session, marks)
    log.info("augmented", created=created, items=len(asked))
    return created

"""Prometheus metrics for the bot (served at /metrics)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Histogram(
    "flywheel_bot_request_seconds", "Time to answer (ack) one Slack HTTP request", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
EVENTS = Counter("flywheel_bot_events_total", "Slack events handled", ["type"])
DUPLICATES = Counter("flywheel_bot_duplicate_events_total", "Retried deliveries dropped by event id")
ANSWERS = Counter("flywheel_bot_answers_total", "Answers posted", ["outcome"])
ANSWER_SECONDS = Histogram(
    "flywheel_bot_answer_seconds", "Gateway time per answer",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
FEEDBACK = Counter("flywheel_bot_feedback_total", "Votes, labels and corrections recorded", ["kind", "value"])
ADMIN = Counter("flywheel_bot_admin_actions_total", "Admin actions by outcome", ["action", "outcome"])
REPORTS = Counter("flywheel_bot_report_messages_total", "Run report posts and updates", ["op"])
MEMORY = Counter("flywheel_bot_memory_total",
                 "How answers used the correction memory (answer / notes / none / error)", ["use"])
IGNORED = Counter("flywheel_bot_ignored_events_total",
                  "Events read and deliberately left alone (from a bot, not for us, not on an answer)", ["reason"])
FORGOTTEN = Counter("flywheel_bot_forgotten_total",
                    "Messages forgotten or updated in the store: deleted or edited in Slack, purged by retention",
                    ["reason"])
REVIEW = Counter("flywheel_bot_review_total",
                 "Correction reviews (pending / approved / rejected / refused / error)", ["outcome"])
GATEWAY_RETRIES = Counter("flywheel_bot_gateway_retries_total",
                          "Refused gateway connections: retried, or given up on", ["outcome"])
REJECTED = Counter("flywheel_bot_rejected_requests_total",
                   "Slack HTTP requests refused before parsing (too large, bad signature, ...)", ["reason"])
REPLIES = Counter("flywheel_bot_replies_total",
                  "How answers reached Slack: native stream or placeholder + updates", ["kind"])
ASSISTANT = Counter("flywheel_bot_assistant_calls_total",
                    "Assistant-thread calls (greeting, status, title) by outcome", ["call", "outcome"])
WATCH_ALERTS = Counter("flywheel_bot_watch_alerts_total",
                       "Promoted versions judged worse than the one before them on real answers")
# The ack front (bot/front.py): what became of the events it acked or refused for the worker.
FORWARDS = Counter("flywheel_bot_forwards_total",
                   "Events API deliveries at the ack front: handed to the bot worker (ok), acked but lost "
                   "(failed), or refused with 503 for Slack to retry (busy, worker down)", ["outcome"])
FORWARD_QUEUE = Gauge("flywheel_bot_forward_queue", "Events the ack front acked and has yet to hand to the worker")

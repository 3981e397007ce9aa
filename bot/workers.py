"""Worker pools by lane. Bolt runs every listener on one executor; answers hold a worker for
seconds to minutes, while slash commands, buttons and modals must answer within Slack's 3 s.
This executor sends each request's work to its lane's pool, so answers can fill theirs and
`/flywheel rollback` still runs. A Bolt middleware names the lane: middleware runs in the
dispatching thread just before Bolt submits that request's listeners, in HTTP and Socket Mode."""
from __future__ import annotations

import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

ANSWERS, COMMANDS = "answers", "commands"
_lane = threading.local()


def lane_of(body: dict) -> str:
    """Events (questions, reactions, App Home) are answer work; everything a person clicked or
    typed as a command is command work."""
    return ANSWERS if body.get("type") == "event_callback" else COMMANDS


def lane_middleware(body, next):  # noqa: A002 - Bolt injects arguments by these names
    _lane.name = lane_of(body or {})
    next()


class LaneExecutor(Executor):
    def __init__(self, answer_threads: int, command_threads: int) -> None:
        self.pools = {
            ANSWERS: ThreadPoolExecutor(max_workers=answer_threads, thread_name_prefix="bot-listener"),
            COMMANDS: ThreadPoolExecutor(max_workers=command_threads, thread_name_prefix="bot-command"),
        }
        self.sizes = {ANSWERS: answer_threads, COMMANDS: command_threads}

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.pools[getattr(_lane, "name", ANSWERS)].submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)

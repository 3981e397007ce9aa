"""Worker pools by lane. Bolt runs every listener on one executor; answers hold a worker for
seconds to minutes, while slash commands, buttons and modals must answer within Slack's 3 s.
This executor sends each request's work to its lane's pool, so answers can fill theirs and
`/flywheel rollback` still runs. A Bolt middleware names the lane: middleware runs in the
dispatching thread just before Bolt submits that request's listeners, in HTTP and Socket Mode."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

ANSWERS, COMMANDS = "answers", "commands"
_lane = threading.local()


def lane_of(body: dict) -> str:
    """Events (questions, reactions, App Home) are answer work; everything a person clicked or
    typed as a command is command work."""
    return ANSWERS if body.get("type") == "event_callback" else COMMANDS


def lane_middleware(body, context, next):  # noqa: A002 - Bolt injects arguments by these names
    """Names the lane, and notes when the request arrived (`context["arrived"]`, time.monotonic()):
    an answer's deadline counts from there, however long it then waits."""
    context["arrived"] = time.monotonic()
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


class FairQueue:
    """The answer workers: questions wait here, each person's in a line of their own, and the
    workers serve the lines in turn (round robin). One person may have at most `user_running`
    answers being written and `user_waiting` waiting; everyone together at most `capacity`
    waiting. So a person flooding the bot never holds more than `user_running` of the `threads`
    workers, and their waiting questions are never ahead of anyone else's: beyond their share they
    are refused (`offer` says False) and the caller tells them so."""

    def __init__(self, threads: int, *, user_running: int, user_waiting: int, capacity: int,
                 name: str = "bot-answer") -> None:
        self.threads, self.user_running, self.user_waiting, self.capacity = (
            threads, user_running, user_waiting, capacity)
        self._cond = threading.Condition()
        self._lines: dict[str, deque[Callable[[], None]]] = {}
        self._turns: deque[str] = deque()  # people with questions waiting, next first
        self._running: Counter[str] = Counter()
        self._waiting = 0
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def has_room(self, user: str) -> bool:
        with self._cond:
            return self._room(user)

    def _room(self, user: str) -> bool:
        return (not self._closed and self._waiting < self.capacity
                and len(self._lines.get(user, ())) < self.user_waiting)

    def offer(self, user: str, job: Callable[[], None]) -> bool:
        """Queue `job` in `user`'s line; False (nothing queued) beyond their share or the bound."""
        with self._cond:
            if not self._room(user):
                return False
            line = self._lines.setdefault(user, deque())
            if not line:
                self._turns.append(user)
            line.append(job)
            self._waiting += 1
            self._cond.notify()
            return True

    def waiting(self) -> int:
        return self._waiting

    def _next(self) -> tuple[str, Callable[[], None]] | None:
        """The first person in turn who may start one more answer, moved to the back of the turns."""
        for i, user in enumerate(self._turns):
            if self._running[user] < self.user_running:
                del self._turns[i]
                line = self._lines[user]
                job = line.popleft()
                if line:
                    self._turns.append(user)
                else:
                    del self._lines[user]
                self._waiting -= 1
                self._running[user] += 1
                return user, job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                user, job = self._cond.wait_for(self._next)
            try:
                job()
            finally:
                with self._cond:
                    self._running[user] -= 1
                    if not self._running[user]:
                        del self._running[user]
                    self._cond.notify_all()

    def close(self) -> None:
        """Take no more questions (shutdown); what waits is still served."""
        with self._cond:
            self._closed = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued and running answer finished within `timeout_s`."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._running, timeout_s)

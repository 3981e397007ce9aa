"""A local Slack: a real HTTP server on loopback that answers the Web API methods the bot uses
like Slack does and records every call, plus a sender of correctly signed Slack requests.

The only fake in the project (Slack itself cannot run here). Tests assert on `calls`; the demo
runs it with `printer=` to show what the bot would post. Shapes follow api.slack.com."""
from __future__ import annotations

import itertools
import json
import math
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import httpx
from slack_sdk.signature import SignatureVerifier

from flywheel.app.demo.block_kit import message_errors, view_errors
from flywheel.app.demo.socket_mode import Envelope, SocketModeServer

BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"
TEAM_ID = "T0000001"
APP_ID = "A0000001"

# Methods whose Block Kit payload is checked against Slack's limits first.
MESSAGE_METHODS = ("chat.postMessage", "chat.postEphemeral", "chat.update", "chat.stopStream")
VIEW_METHODS = ("views.open", "views.publish", "views.update", "views.push")
STREAM_METHODS = ("chat.startStream", "chat.appendStream", "chat.stopStream")
ASSISTANT_METHODS = ("assistant.threads.setStatus", "assistant.threads.setTitle",
                     "assistant.threads.setSuggestedPrompts")


@dataclass
class Call:
    """One request the bot made: the API method (or 'upload' / 'response'), its arguments."""

    method: str
    args: dict
    token: str | None
    at: float = field(default_factory=time.time)
    response: dict | None = None  # what the double answered


_clock_lock = threading.Lock()
_last_ts = [0.0]


def new_ts() -> str:
    """A Slack message timestamp: wall-clock seconds with microseconds, strictly increasing
    across the double and the sender, as Slack's are within a channel."""
    with _clock_lock:
        now = max(time.time(), _last_ts[0] + 0.000001)
        _last_ts[0] = now
        return f"{now:.6f}"


class _State:
    """What the double remembers between calls: messages, views, uploads."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], dict] = {}
        self.uploads: dict[str, dict] = {}
        self.views: dict[str, dict] = {}
        self.failures: dict[str, list[tuple[int, str, int]]] = {}
        self.limited_until: dict[str, float] = {}  # method -> monotonic time its Retry-After ends
        self.refused: list[tuple[str, list[str]]] = []  # payloads Slack would refuse (Block Kit limits)

    def next_ts(self) -> str:
        return new_ts()

    def failure(self, method: str) -> tuple[int, str, int] | None:
        """The failure a call to `method` gets now (status, error, Retry-After), if any; the
        caller holds the lock. A call before a 429's Retry-After has passed is limited again."""
        now = time.monotonic()
        early = self.limited_until.get(method, 0.0) - now
        if early > 0:  # called again before the Retry-After we gave: still limited
            failure = (429, "ratelimited", max(1, math.ceil(early)))
        else:
            pending = self.failures.get(method)
            failure = pending.pop(0) if pending else None
        if failure is not None and failure[0] == 429:
            self.limited_until[method] = now + failure[2]
        return failure


class SlackDouble:
    """Start with `with SlackDouble() as slack:`; point WebClient at `slack.api_url`."""

    def __init__(self, *, bot_token: str = "xoxb-test-token", bot_user_id: str = BOT_USER_ID,
                 team_id: str = TEAM_ID, users: dict[str, dict] | None = None,
                 printer: Callable[[str], None] | None = None, port: int = 0,
                 private_channels: set[str] | None = None, app_token: str = "xapp-1-test-token",
                 streaming: bool = False, external_channels: set[str] | None = None,
                 plan_blocks: bool = True) -> None:
        self.bot_token, self.bot_user_id, self.team_id = bot_token, bot_user_id, team_id
        self.app_token = app_token  # the app-level token `apps.connections.open` wants
        # chat.startStream / appendStream / stopStream: a workspace where they are off (the
        # default here) refuses them, and the bot must fall back to placeholder + chat.update
        self.streaming = streaming
        self._socket_mode: SocketModeServer | None = None
        self.private_channels = set(private_channels or ())  # C… ids that are private channels
        self.external_channels = set(external_channels or ())  # C… ids shared with another organisation
        # task / plan blocks (Slack's "thinking steps"): a workspace or surface without them refuses them
        self.plan_blocks = plan_blocks
        self.users = users or {}
        self.printer = printer
        self.state = _State()
        self._methods = self._web_api()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    def start(self) -> SlackDouble:
        self._thread = threading.Thread(target=self._server.serve_forever, name="slack-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._socket_mode is not None:
            self._socket_mode.stop()

    @property
    def socket_mode(self) -> SocketModeServer:
        """Slack's Socket Mode websocket server, started on first use."""
        with self.state.lock:
            if self._socket_mode is None:
                self._socket_mode = SocketModeServer(APP_ID).start()
            return self._socket_mode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at ------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def wait_for(self, method: str, predicate: Callable[[Call], bool] = lambda c: True,
                 count: int = 1, timeout: float = 30.0) -> list[Call]:
        """Block until `count` calls to `method` match; fail with what was seen instead."""
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while True:
                found = [c for c in self.state.calls if c.method == method and predicate(c)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(c.method, {k: c.args.get(k) for k in ("channel", "text")}) for c in self.state.calls]
                    raise AssertionError(f"expected {count} {method} call(s) within {timeout}s; saw {seen}")
                self.state.lock.wait(min(left, 0.2))

    def message(self, channel: str, ts: str) -> dict | None:
        with self.state.lock:
            msg = self.state.messages.get((channel, ts))
            return dict(msg) if msg else None

    def thread(self, channel: str, thread_ts: str) -> list[dict]:
        with self.state.lock:
            msgs = [m for (ch, _ts), m in self.state.messages.items()
                    if ch == channel and (m.get("thread_ts") == thread_ts or m["ts"] == thread_ts)]
        return sorted(msgs, key=lambda m: float(m["ts"]))

    def fail_next(self, method: str, *, status: int = 429, error: str = "ratelimited",
                  retry_after: int = 1, times: int = 1) -> None:
        """Make the next `times` calls to `method` fail (429 + Retry-After, like Slack's limits).
        Like Slack, a call made before a 429's Retry-After has passed is refused again (and
        does not use up one of the `times`): a client that does not wait cannot get through."""
        with self.state.lock:
            self.state.failures.setdefault(method, []).extend([(status, error, retry_after)] * times)

    def clear_limits(self) -> None:
        """Forget injected failures and Retry-After windows (a test that set them cleans up)."""
        with self.state.lock:
            self.state.failures.clear()
            self.state.limited_until.clear()

    def reset(self) -> None:
        with self.state.lock:
            self.state.calls.clear()
            self.state.failures.clear()
            self.state.limited_until.clear()

    # -- the Web API -------------------------------------------------------------------------
    def _user(self, user_id: str) -> dict:
        base = {"id": user_id, "team_id": self.team_id, "name": user_id.lower(),
                "real_name": f"User {user_id}", "is_bot": user_id == self.bot_user_id,
                "profile": {"display_name": user_id.lower(), "real_name": f"User {user_id}"}}
        return {**base, **self.users.get(user_id, {})}

    def _post(self, args: dict, *, ephemeral: bool = False) -> dict:
        channel = args.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not (args.get("text") or args.get("blocks")):
            return {"ok": False, "error": "no_text"}
        blocks = _maybe_json(args.get("blocks"))
        ts = self.state.next_ts()
        msg = {"type": "message", "ts": ts, "text": args.get("text", ""), "blocks": blocks or [],
               "user": self.bot_user_id, "bot_id": BOT_ID, "app_id": APP_ID, "team": self.team_id}
        if args.get("thread_ts"):
            msg["thread_ts"] = args["thread_ts"]
        if ephemeral:
            return {"ok": True, "message_ts": ts}
        self.state.messages[(channel, ts)] = msg
        return {"ok": True, "channel": channel, "ts": ts, "message": msg}

    @property
    def refused(self) -> list[tuple[str, list[str]]]:
        """(method, errors) for every payload refused as Slack would refuse it (Block Kit limits)."""
        with self.state.lock:
            return list(self.state.refused)

    def _refuse(self, method: str, errors: list[str]) -> dict:
        self.state.refused.append((method, errors))
        return {"ok": False, "error": "invalid_blocks", "response_metadata": {"messages": errors}}

    def _stream(self, method: str, args: dict) -> dict:
        """Slack's text streaming: a message that grows by appends and ends with optional blocks."""
        if not self.streaming:
            return {"ok": False, "error": "feature_not_enabled"}
        channel = args.get("channel")
        if method == "chat.startStream":
            if not channel or not args.get("thread_ts"):
                return {"ok": False, "error": "invalid_arguments"}  # streams are always replies
            if channel.startswith(("C", "G")) and not (args.get("recipient_user_id") and args.get("recipient_team_id")):
                return {"ok": False, "error": "missing_recipient"}  # required when streaming to channels
            posted = self._post({"channel": channel, "thread_ts": args["thread_ts"],
                                 "text": args.get("markdown_text") or " "})
            msg = posted["message"]
            msg.update(text=args.get("markdown_text") or "", streaming=True)
            return {"ok": True, "channel": channel, "ts": posted["ts"]}
        msg = self.state.messages.get((channel, args.get("ts")))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if not msg.get("streaming"):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        text = args.get("markdown_text") or ""
        if len(text) > 12_000:
            return {"ok": False, "error": "msg_too_long"}
        msg["text"] += text
        if method == "chat.stopStream":
            msg["streaming"] = False
            msg["blocks"] = _maybe_json(args.get("blocks")) or []
        return {"ok": True, "channel": channel, "ts": args.get("ts")}

    def _assistant(self, method: str, args: dict) -> dict:
        # suggested prompts may name no thread (the agent view: the DM itself); the rest need one
        needs_thread = method != "assistant.threads.setSuggestedPrompts"
        if not args.get("channel_id") or (needs_thread and not args.get("thread_ts")):
            return {"ok": False, "error": "invalid_arguments"}
        if method == "assistant.threads.setSuggestedPrompts":
            prompts = _maybe_json(args.get("prompts")) or []
            if not 1 <= len(prompts) <= 4 or any(not (p.get("title") and p.get("message")) for p in prompts):
                return {"ok": False, "error": "invalid_arguments"}  # Slack takes 1 to 4 prompts
        return {"ok": True}

    def handle(self, method: str, args: dict) -> dict:
        """One Web API call; `args` are the merged query, form and JSON arguments."""
        refused = self._check_payload(method, args)
        if refused is not None:
            return refused
        answer = self._methods.get(method)
        if answer is None:
            return {"ok": False, "error": "unknown_method"}
        return answer(args)

    def _web_api(self) -> dict[str, Callable[[dict], dict]]:
        """The Web API methods the double answers: name → handler of the call's arguments."""
        return {
            "api.test": lambda args: {"ok": True, "args": args},
            "apps.connections.open": lambda args: {"ok": True, "url": self.socket_mode.url()},
            "auth.test": self._auth_test,
            "chat.postMessage": self._post,
            "chat.postEphemeral": self._post_ephemeral,
            "chat.update": self._update,
            **{method: partial(self._stream, method) for method in STREAM_METHODS},
            **{method: partial(self._assistant, method) for method in ASSISTANT_METHODS},
            "reactions.add": self._add_reaction,
            "users.info": self._users_info,
            "conversations.info": self._conversations_info,
            "conversations.replies": lambda args: {
                "ok": True, "messages": self.thread(args.get("channel", ""), args.get("ts", "")), "has_more": False},
            **{method: partial(self._view, method) for method in VIEW_METHODS},
            "files.getUploadURLExternal": self._upload_url,
            "files.completeUploadExternal": self._complete_upload,
        }

    def _check_payload(self, method: str, args: dict) -> dict | None:
        """Slack's refusal of a message or view its Block Kit limits do not allow; None if none."""
        if method in MESSAGE_METHODS:
            blocks = _maybe_json(args.get("blocks"))
            errors = message_errors({**args, "blocks": blocks})
            if errors:
                return self._refuse(method, errors)
            if not self.plan_blocks and any(isinstance(b, dict) and b.get("type") in ("plan", "task_card")
                                            for b in blocks or []):
                return {"ok": False, "error": "invalid_blocks"}  # not a bot bug: this workspace lacks them
        if method in VIEW_METHODS:
            errors = view_errors(_maybe_json(args.get("view")))
            if errors:
                return self._refuse(method, errors)
        return None

    def _auth_test(self, _args: dict) -> dict:
        return {"ok": True, "url": "https://flywheel-test.slack.com/", "team": "Flywheel Test",
                "user": "flywheel", "team_id": self.team_id, "user_id": self.bot_user_id,
                "bot_id": BOT_ID, "is_enterprise_install": False}

    def _post_ephemeral(self, args: dict) -> dict:
        if not args.get("user"):
            return {"ok": False, "error": "user_not_found"}
        return self._post(args, ephemeral=True)

    def _update(self, args: dict) -> dict:
        key = (args.get("channel"), args.get("ts"))
        msg = self.state.messages.get(key)
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        msg["text"] = args.get("text", msg["text"])
        if "blocks" in args:
            msg["blocks"] = _maybe_json(args["blocks"]) or []
        msg.setdefault("edits", 0)
        msg["edits"] += 1
        return {"ok": True, "channel": key[0], "ts": key[1], "text": msg["text"], "message": msg}

    def _add_reaction(self, args: dict) -> dict:
        key = (args.get("channel"), args.get("timestamp"))
        if key not in self.state.messages:
            return {"ok": True}  # user messages live in Slack only; accept like Slack does
        reactions = self.state.messages[key].setdefault("reactions", [])
        if any(r["name"] == args.get("name") for r in reactions):
            return {"ok": False, "error": "already_reacted"}
        reactions.append({"name": args.get("name"), "users": [self.bot_user_id], "count": 1})
        return {"ok": True}

    def _users_info(self, args: dict) -> dict:
        if not args.get("user"):
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": self._user(args["user"])}

    def _conversations_info(self, args: dict) -> dict:
        channel = args.get("channel") or ""
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        is_im = channel.startswith("D")
        return {"ok": True, "channel": {
            "id": channel, "is_im": is_im, "is_mpim": False, "is_channel": not is_im,
            "is_private": is_im or channel.startswith("G") or channel in self.private_channels,
            "is_shared": channel in self.external_channels, "is_ext_shared": channel in self.external_channels}}

    def _view(self, method: str, args: dict) -> dict:
        view = _maybe_json(args.get("view"))
        if not isinstance(view, dict) or "type" not in view:
            return {"ok": False, "error": "invalid_arguments"}
        if method == "views.open" and not args.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        views = self.state.views
        view_id = args.get("view_id") or f"V{len(views) + 1:08d}"
        full = {**view, "id": view_id, "team_id": self.team_id, "user_id": args.get("user_id")}
        views[view_id] = full
        return {"ok": True, "view": full}

    def _upload_url(self, args: dict) -> dict:
        if not args.get("filename") or not str(args.get("length", "")).isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        uploads = self.state.uploads
        file_id = f"F{len(uploads) + 1:08d}"
        uploads[file_id] = {"id": file_id, "name": args["filename"], "length": int(args["length"]), "data": None}
        return {"ok": True, "upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}

    def _complete_upload(self, args: dict) -> dict:
        files = _maybe_json(args.get("files")) or []
        done = []
        for item in files:
            up = self.state.uploads.get(item.get("id"))
            if up is None or up["data"] is None:
                return {"ok": False, "error": "file_not_found"}
            up.update(title=item.get("title"), channel=args.get("channel_id"),
                      thread_ts=args.get("thread_ts"))
            done.append({"id": up["id"], "name": up["name"], "title": up.get("title"),
                         "size": len(up["data"])})
        return {"ok": True, "files": done}

    def _log(self, call: Call, response: dict) -> None:
        if self.printer is None:
            return
        a = call.args
        if call.method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            where = a.get("channel", "?") + (f" (thread {a['thread_ts']})" if a.get("thread_ts") else "")
            who = f" to {a['user']}" if a.get("user") else ""
            text = _render(a)
            self.printer(f"[slack] {call.method} {where}{who}:\n{_indent(text)}")
        elif call.method in ("views.open", "views.publish"):
            view = _maybe_json(a.get("view")) or {}
            self.printer(f"[slack] {call.method} {view.get('type')}:\n{_indent(_render({'blocks': view.get('blocks')}))}")
        elif call.method == "upload":
            self.printer(f"[slack] file uploaded ({a.get('bytes')} bytes)")
        elif call.method == "files.completeUploadExternal":
            self.printer(f"[slack] file shared in {a.get('channel_id')}: {a.get('files')}")
        elif call.method == "response":
            self.printer(f"[slack] reply to the command ({a.get('response_type', 'ephemeral')}):\n{_indent(_render(a))}")
        elif call.method not in ("auth.test",):
            self.printer(f"[slack] {call.method} {json.dumps(a)[:200]}")


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _render(args: dict) -> str:
    """Block Kit as plain lines, for the printing mode."""
    blocks = _maybe_json(args.get("blocks")) or []
    lines: list[str] = []
    for block in blocks if isinstance(blocks, list) else []:
        kind = block.get("type")
        if kind in ("section", "header") and block.get("text"):
            lines.append(block["text"].get("text", ""))
        for f in block.get("fields") or []:
            lines.append(f.get("text", ""))
        if kind == "context":
            lines.extend(e.get("text", "") for e in block.get("elements", []) if isinstance(e, dict))
        if kind in ("actions", "context_actions"):
            labels = []
            for e in block.get("elements", []):
                if e.get("type") == "feedback_buttons":
                    labels += ["👍", "👎"]
                elif e.get("text"):
                    labels.append(e["text"].get("text", ""))
            lines.append(" ".join(f"[{x}]" for x in labels))
    return "\n".join(x for x in lines if x) or args.get("text", "")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in str(text).splitlines())


def _make_handler(double: SlackDouble) -> type[BaseHTTPRequestHandler]:
    """The request handler class of the double's HTTP server, bound to `double`."""
    return type("Handler", (_Handler,), {"double": double})


class _Handler(BaseHTTPRequestHandler):
    """The double over HTTP: /api/<method> (the Web API), /upload/<file id> (the bytes of an
    external upload) and /response/<id> (a response_url); every request is recorded as a Call."""

    protocol_version = "HTTP/1.1"
    double: SlackDouble  # set by _make_handler

    def log_message(self, *args) -> None:  # quiet: calls are recorded instead
        pass

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _args(self, raw: bytes) -> dict:
        parsed = urllib.parse.urlsplit(self.path)
        args = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        ctype = self.headers.get("Content-Type", "")
        if raw and "application/json" in ctype:
            args.update(json.loads(raw))
        elif raw and "application/x-www-form-urlencoded" in ctype:
            args.update({k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode()).items()})
        return args

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/upload/"):
            self._upload(path.rsplit("/", 1)[-1], raw)
        elif path.startswith("/response/"):
            self._response(path.rsplit("/", 1)[-1], raw)
        elif path.startswith("/api/"):
            self._api(path[len("/api/"):], raw)
        else:
            self._reply(404, {"ok": False, "error": "not_found"})

    do_POST = _handle
    do_GET = _handle

    def _upload(self, file_id: str, raw: bytes) -> None:
        st = self.double.state
        with st.lock:
            up = st.uploads.get(file_id)
            if up is not None:
                up["data"] = raw
            call = Call("upload", {"file_id": file_id, "bytes": len(raw)}, None)
            st.calls.append(call)
            st.lock.notify_all()
        self.double._log(call, {})
        self._reply(200 if up is not None else 404, {"ok": up is not None})

    def _response(self, response_id: str, raw: bytes) -> None:
        try:
            args = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._reply(400, {"ok": False, "error": "invalid_json"})
            return
        call = Call("response", {**args, "response_id": response_id}, None)
        errors = message_errors(args) if isinstance(args, dict) else ["response: not an object"]
        st = self.double.state
        with st.lock:
            st.calls.append(call)
            if errors:
                st.refused.append(("response", errors))
            st.lock.notify_all()
        if errors:
            self._reply(400, {"ok": False, "error": "invalid_blocks", "response_metadata": {"messages": errors}})
            return
        self.double._log(call, {})
        self._reply(200, {"ok": True})

    def _api(self, method: str, raw: bytes) -> None:
        try:
            args = self._args(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._reply(200, {"ok": False, "error": "invalid_json"})
            return
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else args.pop("token", None)
        call = Call(method, args, token)
        double, st = self.double, self.double.state
        with st.lock:
            st.calls.append(call)
            failure = st.failure(method)
            if failure is not None:
                status, error, retry_after = failure
                response = {"ok": False, "error": error}
            elif token != (double.app_token if method == "apps.connections.open" else double.bot_token):
                response = {"ok": False, "error": "invalid_auth" if token else "not_authed"}
            else:
                response = double.handle(method, args)
            call.response = response
            st.lock.notify_all()
        if failure is not None:
            self._reply(status, response, {"Retry-After": str(retry_after)})
            return
        double._log(call, response)
        self._reply(200, response)


class SlackSender:
    """Plays Slack's side towards the bot: correctly signed Events API, interactivity and
    slash-command requests (HMAC-SHA256 of `v0:{timestamp}:{body}`)."""

    def __init__(self, url: str, signing_secret: str, *, double: SlackDouble | None = None,
                 team_id: str = TEAM_ID, timeout: float = 30.0) -> None:
        self.url, self.secret, self.double, self.team_id = url, signing_secret, double, team_id
        self.client = httpx.Client(timeout=timeout)
        self._ids = itertools.count(1)
        self.last_response_id: str | None = None

    def close(self) -> None:
        self.client.close()

    def _trigger_id(self) -> str:
        """Unique like Slack's: the bot claims each one once in the store (bot/replays.py), and
        tests that share a store each start a sender."""
        return f"trig.{next(self._ids)}.{uuid.uuid4().hex[:12]}"

    def next_ts(self) -> str:
        """A timestamp for a person's message, ordered with the bot's."""
        return new_ts()

    def headers(self, body: str, *, timestamp: int | None = None, secret: str | None = None,
                content_type: str = "application/json") -> dict:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = SignatureVerifier(secret or self.secret).generate_signature(timestamp=ts, body=body)
        return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig, "Content-Type": content_type}

    def post_raw(self, body: str, *, content_type: str = "application/json", extra: dict | None = None,
                 **sign_kw) -> httpx.Response:
        headers = {**self.headers(body, content_type=content_type, **sign_kw), **(extra or {})}
        return self.client.post(self.url, content=body.encode(), headers=headers)

    # -- Events API --------------------------------------------------------------------------
    def event_body(self, event: dict, *, event_id: str | None = None) -> str:
        event_id = event_id or f"Ev{uuid.uuid4().hex[:16].upper()}"  # unique, as Slack's are
        return json.dumps({
            "token": "unused", "team_id": self.team_id, "api_app_id": APP_ID, "type": "event_callback",
            "event_id": event_id, "event_time": int(time.time()), "event": event,
            "authorizations": [{"team_id": self.team_id, "user_id": BOT_USER_ID, "is_bot": True}],
        })

    def event(self, event: dict, *, event_id: str | None = None, retry_num: int | None = None,
              **sign_kw) -> httpx.Response:
        extra = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"} if retry_num else None
        return self.post_raw(self.event_body(event, event_id=event_id), extra=extra, **sign_kw)

    def mention(self, text: str, *, user: str = "UALICE01", channel: str = "CGENERAL1",
                ts: str | None = None, thread_ts: str | None = None, **kw) -> tuple[str, httpx.Response]:
        ts = ts or self.next_ts()
        ev = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER_ID}> {text}", "ts": ts,
              "channel": channel, "event_ts": ts, "team": self.team_id}
        if thread_ts:
            ev["thread_ts"] = thread_ts
        return ts, self.event(ev, **kw)

    def message(self, text: str, *, user: str = "UALICE01", channel: str = "CGENERAL1",
                channel_type: str = "channel", ts: str | None = None, thread_ts: str | None = None,
                **kw) -> tuple[str, httpx.Response]:
        ts = ts or self.next_ts()
        ev = {"type": "message", "user": user, "text": text, "ts": ts, "channel": channel,
              "channel_type": channel_type, "event_ts": ts, "team": self.team_id}
        if thread_ts:
            ev["thread_ts"] = thread_ts
        return ts, self.event(ev, **kw)

    def reaction(self, name: str, *, channel: str, ts: str, user: str = "UALICE01",
                 item_user: str = BOT_USER_ID, removed: bool = False, **kw) -> httpx.Response:
        ev = {"type": "reaction_removed" if removed else "reaction_added", "user": user, "reaction": name,
              "item_user": item_user, "item": {"type": "message", "channel": channel, "ts": ts},
              "event_ts": self.next_ts()}
        return self.event(ev, **kw)

    def assistant_thread_started(self, *, user: str = "UALICE01", channel: str = "DASSIST01",
                                 thread_ts: str | None = None, context_channel: str | None = None):
        """The person opened the bot's assistant view: Slack starts a thread in their DM."""
        thread_ts = thread_ts or self.next_ts()
        context = {"channel_id": context_channel, "team_id": self.team_id} if context_channel else {}
        return thread_ts, self.event({"type": "assistant_thread_started", "event_ts": self.next_ts(),
                                      "assistant_thread": {"user_id": user, "channel_id": channel,
                                                           "thread_ts": thread_ts, "context": context}})

    def home_opened(self, user: str = "UALICE01", tab: str = "home", channel: str = "DHOME0001") -> httpx.Response:
        return self.event({"type": "app_home_opened", "user": user, "channel": channel, "tab": tab,
                           "event_ts": self.next_ts()})

    # -- interactivity -----------------------------------------------------------------------
    def interactive(self, payload: dict) -> httpx.Response:
        body = urllib.parse.urlencode({"payload": json.dumps(payload)})
        return self.post_raw(body, content_type="application/x-www-form-urlencoded")

    def _response_url(self) -> str | None:
        """A response_url on the double; its id (last_response_id) finds the bot's reply."""
        if not self.double:
            return None
        self.last_response_id = str(next(self._ids))
        return f"{self.double.base_url}/response/{self.last_response_id}"

    def block_action(self, *, action_id: str, value: str, channel: str, message_ts: str,
                     user: str = "UALICE01", thread_ts: str | None = None, action_type: str = "button",
                     block_id: str = "b1", message: dict | None = None) -> httpx.Response:
        msg = message or {"type": "message", "ts": message_ts, "user": BOT_USER_ID, "text": ""}
        if thread_ts:
            msg.setdefault("thread_ts", thread_ts)
        return self.interactive({
            "type": "block_actions", "team": {"id": self.team_id}, "api_app_id": APP_ID,
            "user": {"id": user, "team_id": self.team_id}, "trigger_id": self._trigger_id(),
            "container": {"type": "message", "message_ts": message_ts, "channel_id": channel,
                          "is_ephemeral": False, "thread_ts": thread_ts},
            "channel": {"id": channel}, "message": msg, "response_url": self._response_url(),
            "actions": [{"type": action_type, "action_id": action_id, "block_id": block_id,
                         "value": value, "action_ts": str(time.time())}],
        })

    def view_submission(self, *, callback_id: str, values: dict, private_metadata: str = "",
                        user: str = "UALICE01") -> httpx.Response:
        return self.interactive({
            "type": "view_submission", "team": {"id": self.team_id}, "api_app_id": APP_ID,
            "user": {"id": user, "team_id": self.team_id}, "trigger_id": self._trigger_id(),
            "view": {"id": f"V{next(self._ids):08d}", "type": "modal", "callback_id": callback_id,
                     "private_metadata": private_metadata, "state": {"values": values}},
        })

    def message_shortcut(self, *, callback_id: str, channel: str, message_ts: str, user: str = "UALICE01",
                         message_user: str = BOT_USER_ID, text: str = "") -> httpx.Response:
        return self.interactive({
            "type": "message_action", "callback_id": callback_id, "team": {"id": self.team_id},
            "user": {"id": user, "team_id": self.team_id}, "channel": {"id": channel},
            "trigger_id": self._trigger_id(), "response_url": self._response_url(),
            "message_ts": message_ts,
            "message": {"type": "message", "ts": message_ts, "user": message_user, "text": text},
        })

    # -- slash commands ----------------------------------------------------------------------
    def command_fields(self, text: str, *, user: str = "UALICE01", channel: str = "CGENERAL1",
                       command: str = "/flywheel") -> dict:
        return {"token": "unused", "team_id": self.team_id, "channel_id": channel, "user_id": user,
                "command": command, "text": text, "api_app_id": APP_ID,
                "response_url": self._response_url() or "", "trigger_id": self._trigger_id()}

    def command(self, text: str, **kw) -> httpx.Response:
        body = urllib.parse.urlencode(self.command_fields(text, **kw))
        return self.post_raw(body, content_type="application/x-www-form-urlencoded")


class SocketModeSender(SlackSender):
    """The same people, over Socket Mode: each event, interaction or command goes to the bot as
    an envelope on its websocket, and the call returns once the bot acked it (within Slack's 3 s,
    or EnvelopeNotAcked)."""

    def __init__(self, double: SlackDouble, *, team_id: str = TEAM_ID) -> None:
        super().__init__("", "", double=double, team_id=team_id)
        self.server = double.socket_mode

    def event(self, event: dict, *, event_id: str | None = None, retry_num: int | None = None,
              **_sign_kw) -> Envelope:
        payload = json.loads(self.event_body(event, event_id=event_id))
        return self.server.wait_ack(self.server.send("events_api", payload, retry_attempt=retry_num or 0,
                                                     retry_reason="timeout" if retry_num else ""))

    def interactive(self, payload: dict) -> Envelope:
        return self.server.wait_ack(self.server.send("interactive", payload))

    def command(self, text: str, **kw) -> Envelope:
        return self.server.wait_ack(self.server.send("slash_commands", self.command_fields(text, **kw)))


def main(argv: list[str] | None = None) -> None:
    """Run the double on its own: `python -m flywheel.app.demo.slack_double --port 3999 --print`."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description="A local Slack Web API double on loopback.")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default="xoxb-test-token", help="the bot token it accepts")
    ap.add_argument("--print", action="store_true", help="print what the bot posts")
    args = ap.parse_args(argv)
    double = SlackDouble(bot_token=args.token, port=args.port, printer=(lambda line: print(line, flush=True)) if args.print else None).start()
    print(f"Slack double at {double.api_url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    double.stop()


if __name__ == "__main__":
    main()

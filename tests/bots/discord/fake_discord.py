"""A loopback fake of the Discord REST routes and gateway events the bot uses.

One aiohttp server plays both halves: REST under ``/api/v10`` (point ``discord.http.Route.BASE`` at it) and the
gateway websocket at ``/gateway`` (point ``DiscordWebSocket.DEFAULT_GATEWAY`` at it). The gateway answers IDENTIFY
with READY and one GUILD_CREATE and acks heartbeats; tests push MESSAGE_CREATE and INTERACTION_CREATE through
:meth:`FakeDiscord.dispatch`. Every REST call is recorded; messages (channel, webhook and interaction ones) are kept
with their edits so that tests read what a user would see (an edit's multipart upload replaces the attachments
the way Discord does: those listed in ``attachments`` stay, the uploaded files join them). :meth:`fail_next` injects
429, 403 or 404 answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

__all__ = [
    "APP_ID",
    "BARE_CHANNEL_ID",
    "BOT_ID",
    "CHANNEL_ID",
    "GUILD_ID",
    "NSFW_CHANNEL_ID",
    "THREAD_ID",
    "FakeDiscord",
    "Posted",
    "Recorded",
    "user_payload",
]

BOT_ID = 900000000000000001
APP_ID = BOT_ID
GUILD_ID = 910000000000000001
CHANNEL_ID = 920000000000000001
NSFW_CHANNEL_ID = 920000000000000002
BARE_CHANNEL_ID = 920000000000000003  # the bot lacks Manage Webhooks here
THREAD_ID = 920000000000000004  # a thread in CHANNEL_ID
OWNER_ID = 930000000000000001
TIMESTAMP = "2026-11-28T02:00:00.000000+00:00"

ALL_PERMISSIONS = (1 << 41) - 1
MANAGE_WEBHOOKS = 1 << 29


@dataclass
class Recorded:
    """One REST request the bot made."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: dict[str, bytes]


@dataclass
class Posted:
    """A message as users see it, after every edit."""

    id: int
    channel_id: int
    payload: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    edits: int = 0
    deleted: bool = False
    via: str = "bot"  # bot | webhook | interaction

    @property
    def content(self) -> str:
        return self.payload.get("content") or ""

    @property
    def username(self) -> str:
        return self.payload["author"]["username"]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer typed exactly ``application/json``, as discord.py expects (no charset)."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    """A Discord user object."""
    return {"id": str(user_id), "username": name, "global_name": name, "discriminator": "0", "avatar": None, "bot": bot}


def channel_payload(channel_id: int, name: str, *, nsfw: bool = False, deny: int = 0) -> dict[str, Any]:
    """A guild text channel; ``deny`` removes permissions from @everyone in it."""
    overwrites = [{"id": str(GUILD_ID), "type": 0, "allow": "0", "deny": str(deny)}] if deny else []
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(GUILD_ID),
        "name": name,
        "position": 0,
        "nsfw": nsfw,
        "permission_overwrites": overwrites,
        "parent_id": None,
    }


def thread_payload(thread_id: int, parent_id: int, name: str) -> dict[str, Any]:
    """A public thread under a guild text channel."""
    return {
        "id": str(thread_id),
        "guild_id": str(GUILD_ID),
        "parent_id": str(parent_id),
        "owner_id": str(OWNER_ID),
        "name": name,
        "type": 11,
        "message_count": 0,
        "member_count": 1,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 60,
            "archive_timestamp": TIMESTAMP,
            "locked": False,
        },
    }


class FakeDiscord:
    """The fake server; ``await start()``, then point discord.py at :attr:`api_base` and :attr:`gateway_url`."""

    def __init__(self, *, bot_permissions: int = ALL_PERMISSIONS & ~(1 << 3)) -> None:
        self._ids = itertools.count(950000000000000001)
        self.bot_permissions = bot_permissions
        self.requests: list[Recorded] = []
        self.messages: dict[int, Posted] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.cdn: dict[str, bytes] = {}
        self.channels: dict[int, dict[str, Any]] = {
            CHANNEL_ID: channel_payload(CHANNEL_ID, "general"),
            NSFW_CHANNEL_ID: channel_payload(NSFW_CHANNEL_ID, "after-dark", nsfw=True),
            BARE_CHANNEL_ID: channel_payload(BARE_CHANNEL_ID, "no-hooks", deny=MANAGE_WEBHOOKS),
        }
        self.threads: dict[int, dict[str, Any]] = {THREAD_ID: thread_payload(THREAD_ID, CHANNEL_ID, "tea-time")}
        self.typing: list[int] = []
        self.callbacks: dict[str, dict[str, Any]] = {}  # interaction token -> its callback body
        self._clicked: dict[str, int] = {}  # component interaction token -> the message pressed
        self.identified = asyncio.Event()
        self._failures: list[tuple[str, re.Pattern[str], int, dict[str, Any]]] = []
        self._changed = asyncio.Condition()
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.base = ""

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"{self.base}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.base.removeprefix('http://')}/gateway"

    def next_id(self) -> int:
        return next(self._ids)

    # --- test controls --------------------------------------------------------------------------------
    def fail_next(self, method: str, path_pattern: str, status: int, body: dict[str, Any] | None = None) -> None:
        """Answer the next matching request with ``status`` (429 carries a tiny retry_after)."""
        if body is None:
            body = {"message": "You are being rate limited.", "retry_after": 0.01, "global": False}
            body = body if status == 429 else {"message": "error", "code": 0}
        self._failures.append((method, re.compile(path_pattern), status, body))

    def add_attachment(self, filename: str, data: bytes, content_type: str) -> dict[str, Any]:
        """Serve ``data`` on the fake CDN and return its attachment object."""
        att_id = self.next_id()
        name = f"{att_id}-{filename}"
        self.cdn[name] = data
        url = f"{self.base}/cdn/{name}"
        return {
            "id": str(att_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send one DISPATCH event on the gateway."""
        await self.identified.wait()
        assert self._ws is not None
        self._seq += 1
        await self._ws.send_json({"op": 0, "t": event, "s": self._seq, "d": data})

    def message_event(
        self,
        content: str,
        *,
        author: dict[str, Any],
        channel_id: int = CHANNEL_ID,
        guild: bool = True,
        mentions: list[dict[str, Any]] | None = None,
        attachments: list[dict[str, Any]] | None = None,
        reference: Posted | None = None,
    ) -> dict[str, Any]:
        """A MESSAGE_CREATE payload from a user."""
        data: dict[str, Any] = {
            "id": str(self.next_id()),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": TIMESTAMP,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": mentions or [],
            "mention_roles": [],
            "attachments": attachments or [],
            "embeds": [],
            "pinned": False,
            "type": 19 if reference else 0,
        }
        if guild:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0}
        else:  # a DM channel, known from now on
            self.channels.setdefault(channel_id, {"id": str(channel_id), "type": 1, "recipients": [author]})
        if reference is not None:
            data["message_reference"] = {"message_id": str(reference.id), "channel_id": str(reference.channel_id)}
            data["referenced_message"] = reference.payload
        return data

    def interaction_event(
        self,
        *,
        user: dict[str, Any],
        data: dict[str, Any],
        kind: int = 2,
        channel_id: int = CHANNEL_ID,
        guild: bool = True,
        message: Posted | None = None,
        permissions: int = ALL_PERMISSIONS,
    ) -> dict[str, Any]:
        """An INTERACTION_CREATE payload: ``kind`` 2 is a slash command, 3 a component, 4 autocomplete."""
        channel = self.channels.get(channel_id) or self.threads.get(channel_id) or {"id": str(channel_id), "type": 1}
        payload: dict[str, Any] = {
            "id": str(self.next_id()),
            "application_id": str(APP_ID),
            "type": kind,
            "token": f"tok{self.next_id()}",
            "version": 1,
            "data": data,
            "channel_id": str(channel_id),
            "channel": channel,
            "app_permissions": str(self.bot_permissions),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
            "authorizing_integration_owners": {},
            "context": 0 if guild else 1,
        }
        if guild:
            payload["guild_id"] = str(GUILD_ID)
            payload["guild_locale"] = "en-US"
            payload["member"] = {
                "user": user,
                "roles": [],
                "joined_at": TIMESTAMP,
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": str(permissions),
            }
        else:
            payload["user"] = user
        if message is not None:
            payload["message"] = message.payload
            self._clicked[payload["token"]] = message.id
        return payload

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request); returns its value."""

        async def _wait() -> Any:
            async with self._changed:
                while not (result := predicate()):
                    # woken by each request, and every so often for conditions outside the fake (SQL rows)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.1)
                return result

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            seen = "\n".join(f"  {r.method} {r.path} {str(r.json)[:300]}" for r in self.requests[-15:])
            raise AssertionError(f"condition not met in {timeout} s; last requests:\n{seen}") from None

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        """The recorded requests whose path matches ``pattern``."""
        regex = re.compile(pattern)
        return [r for r in self.requests if r.method == method and regex.fullmatch(r.path)]

    def in_channel(self, channel_id: int, *, via: str | None = None) -> list[Posted]:
        """Messages standing in a channel, oldest first."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and not m.deleted and (via is None or m.via == via)
        ]

    def interaction_messages(self, token: str) -> list[Posted]:
        """The response and follow-ups of one interaction, oldest first."""
        return [m for m in self.messages.values() if m.payload.get("_token") == token and not m.deleted]

    # --- gateway --------------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["op"] == 1:
                await ws.send_json({"op": 11})
            elif frame["op"] == 2:
                await self._send_ready(ws)
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        self._seq += 1
        ready = {
            "v": 10,
            "user": user_payload(BOT_ID, "UniChar", bot=True),
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(APP_ID), "flags": 0},
        }
        await ws.send_json({"op": 0, "t": "READY", "s": self._seq, "d": ready})
        self._seq += 1
        await ws.send_json({"op": 0, "t": "GUILD_CREATE", "s": self._seq, "d": self._guild()})
        self.identified.set()

    def _guild(self) -> dict[str, Any]:
        bot_role = str(GUILD_ID + 1)
        return {
            "id": str(GUILD_ID),
            "name": "Fake guild",
            "owner_id": str(OWNER_ID),
            "icon": None,
            "roles": [
                {"id": str(GUILD_ID), "name": "@everyone", "permissions": str(self.bot_permissions), "position": 0},
                {"id": bot_role, "name": "UniChar", "permissions": "0", "position": 1},
            ],
            "emojis": [],
            "stickers": [],
            "features": [],
            "member_count": 3,
            "members": [
                {
                    "user": user_payload(BOT_ID, "UniChar", bot=True),
                    "roles": [bot_role],
                    "joined_at": TIMESTAMP,
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            ],
            "channels": list(self.channels.values()),
            "threads": list(self.threads.values()),
            "voice_states": [],
            "presences": [],
            "large": False,
            "unavailable": False,
            "joined_at": TIMESTAMP,
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "nsfw_level": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "system_channel_flags": 0,
        }

    # --- REST -----------------------------------------------------------------------------------------
    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.cdn.get(request.match_info["name"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body, files = await self._read_body(request)
        self.requests.append(Recorded(request.method, path, dict(request.query), body, files))
        try:
            for index, (method, regex, status, fail_body) in enumerate(self._failures):
                if method == request.method and regex.fullmatch(path):
                    del self._failures[index]
                    headers = {"Retry-After": "0.01", "X-RateLimit-Scope": "user"} if status == 429 else {}
                    return _json(fail_body, status=status, headers=headers)
            return await self._route(request.method, path, dict(request.query), body, files)
        finally:
            async with self._changed:
                self._changed.notify_all()

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, dict[str, bytes]]:
        if not request.can_read_body:
            return None, {}
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            files: dict[str, bytes] = {}
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read()  # type: ignore[union-attr]
                if part.name == "payload_json":  # type: ignore[union-attr]
                    payload = json.loads(data)
                else:
                    files[part.filename or part.name or ""] = bytes(data)  # type: ignore[union-attr]
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), {}

    async def _route(
        self, method: str, path: str, query: dict[str, str], body: Any, files: dict[str, bytes]
    ) -> web.Response:
        parts = path.strip("/").split("/")
        match (method, parts):
            case ("GET", ["users", "@me"]):
                return _json(user_payload(BOT_ID, "UniChar", bot=True))
            case ("GET", ["oauth2", "applications", "@me"]):
                return _json(
                    {
                        "id": str(APP_ID),
                        "name": "UniChar",
                        "description": "",
                        "icon": None,
                        "rpc_origins": [],
                        "bot_public": True,
                        "bot_require_code_grant": False,
                        "verify_key": "00",
                        "flags": 0,
                        "owner": user_payload(OWNER_ID, "owner"),
                        "team": None,
                        "summary": "",
                        "interactions_endpoint_url": None,
                    }
                )
            case ("GET", ["gateway", "bot"]):
                limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
                return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})
            case ("POST", ["users", "@me", "channels"]):
                dm_id = int(body["recipient_id"]) + 1
                self.channels.setdefault(dm_id, {"id": str(dm_id), "type": 1})
                recipient = user_payload(int(body["recipient_id"]), "someone")
                return _json({"id": str(dm_id), "type": 1, "recipients": [recipient]})
            case ("GET", ["channels", cid]):
                channel = self.channels.get(int(cid))
                return _json(channel) if channel else _json({"message": "Unknown Channel", "code": 10003}, 404)
            case ("POST", ["channels", cid, "typing"]):
                if missing := self._channel_or_404(cid):
                    return missing
                self.typing.append(int(cid))
                return web.Response(status=204)
            case ("GET", ["channels", cid, "webhooks"]):
                return self._channel_or_404(cid) or _json([w for w in self.webhooks.values() if w["channel_id"] == cid])
            case ("POST", ["channels", cid, "webhooks"]):
                return self._channel_or_404(cid) or _json(self._create_webhook(cid, body["name"]))
            case ("POST", ["channels", cid, "messages"]):
                if missing := self._channel_or_404(cid):
                    return missing
                author = user_payload(BOT_ID, "UniChar", bot=True)
                return _json(self._post(int(cid), body, files, author, via="bot").payload)
            case ("PATCH", ["channels", _cid, "messages", mid]):
                return self._edit(int(mid), body, files)
            case ("DELETE", ["channels", _cid, "messages", mid]):
                return self._delete(int(mid))
            case ("POST", ["webhooks", wid, token]) if int(wid) in self.webhooks:
                hook = self.webhooks[int(wid)]
                if hook["token"] != token:
                    return _json({"message": "Unknown Webhook", "code": 10015}, status=404)
                author = user_payload(int(wid), body.get("username") or hook["name"], bot=True)
                if body.get("avatar_url"):
                    author["avatar_url"] = body["avatar_url"]
                channel = int(query.get("thread_id", hook["channel_id"]))
                posted = self._post(channel, body, files, author, via="webhook", webhook_id=int(wid))
                return _json(posted.payload)
            case ("POST", ["interactions", iid, token, "callback"]):
                return self._interaction_callback(iid, token, body, files)
            case ("POST", ["webhooks", _app, token]):
                author = user_payload(BOT_ID, "UniChar", bot=True)
                posted = self._post(0, body, files, author, via="interaction", token=token)
                return _json(posted.payload)
            case ("GET", ["webhooks", _wid, token, "messages", mid]):
                posted = self._find(token, mid)
                return _json(posted.payload) if posted else web.Response(status=404)
            case ("PATCH", ["webhooks", _wid, token, "messages", mid]):
                posted = self._find(token, mid)
                return self._edit(posted.id, body, files) if posted else web.Response(status=404)
            case ("DELETE", ["webhooks", _wid, token, "messages", mid]):
                posted = self._find(token, mid)
                return self._delete(posted.id) if posted else web.Response(status=404)
            case ("PUT", ["applications", _app, *_scope, "commands"]):
                return _json([dict(c, id=str(self.next_id()), application_id=str(APP_ID), version="1") for c in body])
        return _json({"message": f"fake has no route {method} {path}", "code": 0}, status=404)

    def _channel_or_404(self, cid: str) -> web.Response | None:
        if int(cid) in self.channels or int(cid) in self.threads:
            return None
        return _json({"message": "Unknown Channel", "code": 10003}, status=404)

    def _create_webhook(self, cid: str, name: str) -> dict[str, Any]:
        hook_id = self.next_id()
        hook = {
            "id": str(hook_id),
            "type": 1,
            "channel_id": cid,
            "guild_id": str(GUILD_ID),
            "name": name,
            "avatar": None,
            "token": f"hooktoken{hook_id}",
            "application_id": str(APP_ID),
            "user": user_payload(BOT_ID, "UniChar", bot=True),
        }
        self.webhooks[hook_id] = hook
        return hook

    def _post(
        self,
        channel_id: int,
        body: dict[str, Any],
        files: dict[str, bytes],
        author: dict[str, Any],
        *,
        via: str,
        webhook_id: int | None = None,
        token: str | None = None,
    ) -> Posted:
        message_id = self.next_id()
        payload = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": author,
            "content": body.get("content") or "",
            "timestamp": TIMESTAMP,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": self._attachments(files),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "type": 0,
            "flags": body.get("flags", 0),
            "allowed_mentions": body.get("allowed_mentions"),
        }
        if webhook_id is not None:
            payload["webhook_id"] = str(webhook_id)
        if token is not None:
            payload["_token"] = token
        posted = Posted(message_id, channel_id, payload, dict(files), via=via)
        self.messages[message_id] = posted
        return posted

    def _attachments(self, files: dict[str, bytes]) -> list[dict[str, Any]]:
        return [
            {
                "id": str(self.next_id()),
                "filename": name,
                "size": len(data),
                "url": f"{self.base}/cdn/{name}",
                "proxy_url": f"{self.base}/cdn/{name}",
            }
            for name, data in files.items()
        ]

    def _edit(self, message_id: int, body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        posted = self.messages.get(message_id)
        if posted is None or posted.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        for key in ("content", "embeds", "components", "allowed_mentions", "flags"):
            if key in body:
                posted.payload[key] = body[key]
        if files or "attachments" in body:  # Discord keeps the listed attachments and adds the uploaded files
            kept = {str(a["id"]) for a in body.get("attachments") or []}
            old = [a for a in posted.payload.get("attachments") or [] if a["id"] in kept]
            posted.files = {a["filename"]: posted.files[a["filename"]] for a in old} | files
            posted.payload["attachments"] = old + self._attachments(files)
        posted.payload["edited_timestamp"] = TIMESTAMP
        posted.edits += 1
        return _json(posted.payload)

    def _delete(self, message_id: int) -> web.Response:
        posted = self.messages.get(message_id)
        if posted is None or posted.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        posted.deleted = True
        return web.Response(status=204)

    def _find(self, token: str, mid: str) -> Posted | None:
        if mid == "@original":
            for posted in self.messages.values():
                if posted.payload.get("_token") == token and posted.payload.get("_original"):
                    return posted
            return None
        for hook in self.webhooks.values():
            if hook["token"] == token:
                return self.messages.get(int(mid))
        posted = self.messages.get(int(mid))
        return posted if posted is not None and posted.payload.get("_token") == token else None

    def _interaction_callback(
        self, iid: str, token: str, body: dict[str, Any], files: dict[str, bytes]
    ) -> web.Response:
        kind, data = body["type"], body.get("data") or {}
        self.callbacks[token] = body
        answer: dict[str, Any] = {"interaction": {"id": iid, "type": 2}}
        if kind in (4, 5):  # a message, or "thinking…" to be edited later
            author = user_payload(BOT_ID, "UniChar", bot=True)
            posted = self._post(0, data, files, author, via="interaction", token=token)
            posted.payload["_original"] = True
            posted.payload["_deferred"] = kind == 5
            answer["resource"] = {"type": kind, "message": posted.payload}
        elif kind == 7 and token in self._clicked:  # update the message whose button was pressed
            self._edit(self._clicked[token], data, files)
        else:
            answer["resource"] = {"type": kind}
        return _json(answer)

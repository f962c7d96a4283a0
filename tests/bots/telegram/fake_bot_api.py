"""A loopback fake of the Telegram Bot API, enough for python-telegram-bot's Application to run against it.

The real Application talks HTTP to it through ``base_url``/``base_file_url``: getMe, getUpdates (long polling),
sendMessage, editMessageText, editMessageReplyMarkup, deleteMessage, sendChatAction, sendPhoto (multipart),
answerCallbackQuery, getFile and the file download, deleteWebhook and setMyCommands. It keeps what each chat would
show, enforces Telegram's rules that matter here (4096 UTF-16 units, "message is not modified", 10 MB photos),
and fails on demand: a 429 with ``retry_after`` for a method, a 403 for a user who blocked the bot.

The test plays the users: :meth:`FakeBotApi.send` (text, photos, albums, files, stickers, voice), ``press`` a button,
``edit`` a message, ``block`` the bot; then waits for what the bot does with :meth:`FakeBotApi.wait_for`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

__all__ = ["BOT_ID", "BOT_USERNAME", "TOKEN", "ChatMessage", "FakeBotApi"]

TOKEN = "123456:TEST-token"
BOT_ID = 123456
BOT_USERNAME = "unichar_test_bot"
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "UniChar", "username": BOT_USERNAME,
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
PHOTO_LIMIT = 10 * 1024 * 1024


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class ChatMessage:
    """A message as a chat shows it (by the bot or a user)."""

    chat_id: int
    message_id: int
    from_bot: bool
    text: str = ""
    photo: bytes | None = None
    caption: str = ""
    reply_markup: dict[str, Any] | None = None
    reply_to: int | None = None
    deleted: bool = False
    edits: int = 0

    @property
    def buttons(self) -> list[tuple[str, str]]:
        """(label, callback data) of the inline keyboard, row by row."""
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [(button["text"], button.get("callback_data", "")) for row in rows for button in row]


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None = None


@dataclass
class FakeBotApi:
    """The fake server; ``url`` is what UNICHAR_TELEGRAM_API_URL would be."""

    messages: list[ChatMessage] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)
    url: str = ""
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _files: dict[str, bytes] = field(default_factory=dict)
    _fail_next: dict[str, list[_Failure]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _update_ids: Any = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition | None = None
    _runner: web.AppRunner | None = None

    # --- server life ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request) and return its value."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not (result := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting; bot messages: {[m.text or '<photo>' for m in self.bot_messages()]}")
                try:
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
            return result

    # --- what the test looks at ----------------------------------------------------------------------------

    def bot_messages(self, chat_id: int | None = None) -> list[ChatMessage]:
        """The bot's messages still shown (in a chat, or everywhere), oldest first."""
        return [m for m in self.messages if m.from_bot and not m.deleted and chat_id in (None, m.chat_id)]

    def called(self, method: str) -> list[dict[str, Any]]:
        """Parameters of each call of ``method``."""
        return [params for name, params in self.calls if name == method]

    def fail_next(self, method: str, status: int = 429, retry_after: int = 1, description: str = "") -> None:
        """Make the next call of ``method`` fail (a flood wait by default)."""
        text = description or (f"Too Many Requests: retry after {retry_after}" if status == 429 else "Bad Request")
        self._fail_next.setdefault(method, []).append(_Failure(status, text, retry_after if status == 429 else None))

    # --- the users' side -----------------------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, name: str = "Ann") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": name, "language_code": "en"}

    @staticmethod
    def chat(chat_id: int, user: dict[str, Any] | None = None) -> dict[str, Any]:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": (user or {}).get("first_name", "Ann")}
        return {"id": chat_id, "type": "group", "title": "Test group"}

    def add_file(self, data: bytes) -> str:
        """Store an upload; returns its file_id."""
        file_id = f"file{next(self._ids)}"
        self._files[file_id] = data
        return file_id

    async def send(
        self,
        chat_id: int,
        user_id: int,
        text: str | None = None,
        *,
        photo: bytes | None = None,
        document: tuple[str, str, bytes] | None = None,
        sticker: bool = False,
        voice: bool = False,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        claimed_size: int | None = None,
    ) -> int:
        """A user posts a message; returns its message id."""
        user = self.user(user_id)
        message_id = next(self._ids)
        message: dict[str, Any] = {"message_id": message_id, "date": int(time.time()),
                                   "chat": self.chat(chat_id, user), "from": user}
        if text is not None:
            message["text"] = text
            if entities := _entities(text):
                message["entities"] = entities
        if photo is not None:
            file_id = self.add_file(photo)
            with Image.open(io.BytesIO(photo)) as image:
                width, height = image.size
            message["photo"] = [{"file_id": file_id, "file_unique_id": f"u{file_id}", "width": width,
                                 "height": height, "file_size": claimed_size or len(photo)}]
        if document is not None:
            name, mime, data = document
            message["document"] = {"file_id": self.add_file(data), "file_unique_id": f"d{message_id}",
                                   "file_name": name, "mime_type": mime, "file_size": claimed_size or len(data)}
        if sticker:
            message["sticker"] = {"file_id": self.add_file(b"sticker"), "file_unique_id": "s1", "type": "regular",
                                  "width": 512, "height": 512, "is_animated": False, "is_video": False}
        if voice:
            message["voice"] = {"file_id": self.add_file(b"OggS"), "file_unique_id": "v1", "duration": 2}
        if caption is not None:
            message["caption"] = caption
            if entities := _entities(caption):
                message["caption_entities"] = entities
        if media_group_id is not None:
            message["media_group_id"] = media_group_id
        if reply_to is not None:
            original = self.find(chat_id, reply_to)
            message["reply_to_message"] = self._message_dict(original)
        self.messages.append(ChatMessage(chat_id, message_id, False, text or "", photo, caption or "", None, reply_to))
        await self._push({"message": message})
        return message_id

    async def press(self, chat_id: int, user_id: int, message_id: int, data: str) -> str:
        """A user presses an inline button; returns the callback query id."""
        query_id = f"q{next(self._ids)}"
        original = self.find(chat_id, message_id)
        await self._push({"callback_query": {"id": query_id, "from": self.user(user_id), "chat_instance": "ci",
                                             "message": self._message_dict(original), "data": data}})
        return query_id

    async def edit(self, chat_id: int, user_id: int, message_id: int, text: str) -> None:
        """A user edits an earlier message."""
        user = self.user(user_id)
        await self._push({"edited_message": {"message_id": message_id, "date": int(time.time()) - 60,
                                             "edit_date": int(time.time()), "chat": self.chat(chat_id, user),
                                             "from": user, "text": text}})

    async def block(self, user_id: int) -> None:
        """The user blocks the bot: Telegram says so, and refuses every later message to them."""
        self.blocked.add(user_id)
        user = self.user(user_id)
        await self._push({"my_chat_member": {
            "chat": self.chat(user_id, user), "from": user, "date": int(time.time()),
            "old_chat_member": {"status": "member", "user": BOT_USER},
            "new_chat_member": {"status": "kicked", "user": BOT_USER, "until_date": 0}}})

    def find(self, chat_id: int, message_id: int) -> ChatMessage:
        return next(m for m in self.messages if m.chat_id == chat_id and m.message_id == message_id)

    async def _push(self, update: dict[str, Any]) -> None:
        update["update_id"] = next(self._update_ids)
        self._updates.append(update)
        await self._notify()

    def _message_dict(self, message: ChatMessage) -> dict[str, Any]:
        out: dict[str, Any] = {"message_id": message.message_id, "date": int(time.time()),
                               "chat": self.chat(message.chat_id)}
        out["from"] = BOT_USER if message.from_bot else self.user(message.chat_id if message.chat_id > 0 else 1)
        if message.text:
            out["text"] = message.text
        if message.photo is not None:
            out["photo"] = [{"file_id": "p", "file_unique_id": "p", "width": 1, "height": 1}]
            if message.caption:
                out["caption"] = message.caption
        if message.reply_markup:
            out["reply_markup"] = message.reply_markup
        return out

    # --- the Bot API -----------------------------------------------------------------------------------------

    async def _method(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != TOKEN:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if part.filename is not None:
                    files[part.name] = await part.read()
                else:
                    params[part.name] = await part.text()
        elif request.can_read_body:
            if request.content_type == "application/json":
                params = await request.json()
            else:
                params = dict(await request.post())
        params = {key: _decode(value) if key in _JSON_PARAMS else value for key, value in params.items()}
        if method != "getUpdates":
            self.calls.append((method, params))
        pending = self._fail_next.get(method)
        failure = pending.pop(0) if pending else None
        if failure is not None:
            await self._notify()
            return _error(failure.status, failure.description, failure.retry_after)
        chat_id = params.get("chat_id")
        if chat_id is not None and int(chat_id) in self.blocked and method != "getUpdates":
            await self._notify()
            return _error(403, "Forbidden: bot was blocked by the user")
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return _error(404, f"Not Found: method {method} is not faked")
        try:
            result = await handler(params, files)
        except _ApiError as error:
            await self._notify()
            return _error(400, error.args[0])
        await self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["path"].rsplit("/", 1)[-1]
        data = self._files.get(file_id)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data)

    async def _api_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return BOT_USER

    async def _api_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _api_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _api_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]  # confirmed ones are gone
        deadline = time.monotonic() + min(timeout, 2.0)
        assert self._changed is not None
        async with self._changed:
            while not self._updates and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
        return list(self._updates[: int(params.get("limit") or 100)])

    def _bot_message(self, chat_id: int, **fields: Any) -> ChatMessage:
        message = ChatMessage(chat_id, next(self._ids), True, **fields)
        self.messages.append(message)
        return message

    async def _api_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        text = str(params["text"])
        if not text.strip():
            raise _ApiError("Bad Request: message text is empty")
        if utf16_len(text) > 4096:
            raise _ApiError("Bad Request: message is too long")
        reply = (params.get("reply_parameters") or {}).get("message_id")
        message = self._bot_message(int(params["chat_id"]), text=text, reply_markup=params.get("reply_markup"),
                                    reply_to=reply)
        return self._message_dict(message)

    async def _api_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._editable(params)
        text = str(params["text"])
        if utf16_len(text) > 4096:
            raise _ApiError("Bad Request: MESSAGE_TOO_LONG")
        markup = params.get("reply_markup")
        if text == message.text and markup == message.reply_markup:
            raise _ApiError("Bad Request: message is not modified: specified new message content and reply markup "
                            "are exactly the same as a current content and reply markup of the message")
        message.text, message.reply_markup, message.edits = text, markup, message.edits + 1
        return self._message_dict(message)

    async def _api_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._editable(params)
        message.reply_markup = params.get("reply_markup")
        return self._message_dict(message)

    def _editable(self, params: dict[str, Any]) -> ChatMessage:
        try:
            message = self.find(int(params["chat_id"]), int(params["message_id"]))
        except StopIteration:
            raise _ApiError("Bad Request: message to edit not found") from None
        if message.deleted or not message.from_bot:
            raise _ApiError("Bad Request: message to edit not found")
        return message

    async def _api_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        try:
            self.find(int(params["chat_id"]), int(params["message_id"])).deleted = True
        except StopIteration:
            raise _ApiError("Bad Request: message to delete not found") from None
        return True

    async def _api_sendChatAction(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _api_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _api_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = files.get("photo")
        if data is None:
            raise _ApiError("Bad Request: there is no photo in the request")
        if len(data) > PHOTO_LIMIT:
            raise _ApiError("Bad Request: PHOTO_INVALID_DIMENSIONS")
        Image.open(io.BytesIO(data)).verify()
        reply = (params.get("reply_parameters") or {}).get("message_id")
        message = self._bot_message(int(params["chat_id"]), photo=data, caption=str(params.get("caption") or ""),
                                    reply_markup=params.get("reply_markup"), reply_to=reply)
        return self._message_dict(message)

    async def _api_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        file_id = str(params["file_id"])
        if file_id not in self._files:
            raise _ApiError("Bad Request: invalid file_id")
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(self._files[file_id]),
                "file_path": f"photos/{file_id}"}


class _ApiError(Exception):
    """A 400 with Telegram's description."""


def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)


_JSON_PARAMS = frozenset({"reply_markup", "reply_parameters", "commands", "allowed_updates", "entities"})


def _decode(value: Any) -> Any:
    """A form value that carries JSON (reply markup, reply parameters) as an object."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _entities(text: str) -> list[dict[str, Any]]:
    """The entities Telegram would attach: a leading bot command, and @mentions."""
    entities = []
    if text.startswith("/"):
        command = text.split(maxsplit=1)[0]
        entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(command)})
    for word_start, word in _words(text):
        if word.startswith("@") and len(word) > 1:
            entities.append({"type": "mention", "offset": utf16_len(text[:word_start]), "length": utf16_len(word)})
    return entities


def _words(text: str) -> list[tuple[int, str]]:
    out, position = [], 0
    for word in text.split():
        start = text.index(word, position)
        out.append((start, word.rstrip(".,!?")))
        position = start + len(word)
    return out

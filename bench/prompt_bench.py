"""Benchmark: assembling the prompt of a 10,000-message conversation from SQL, as a chat worker does per reply.

The conversation, its character (card with a lorebook), the user's persona, pinned facts and a rolling summary are
stored in a fresh SQLite file (the default store) or, with ``--database-url``, any SQL database. The recall index
is built once (what the lazy indexer would have done over the conversation's life; its one-off cost is printed
too), then each iteration stores one new user turn, as the chat service does, and times ``assemble_prompt`` in its
own transaction: window, summary, facts, BM25 recall (including indexing the new turn), lorebook scan, token
counting with the tiny model's tokenizer and budget fitting.

    python -m bench.prompt_bench [--messages 10000] [--iterations 200] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert, text

from core import memory
from core.config import Settings
from core.db.models import Base, Character, Chat, Conversation, Message, User
from core.db.session import make_engine, make_sessionmaker
from core.model.tiny import tiny_tokenizer
from core.prompting import assemble_prompt
from unichar.arguments import at_least

WORDS = (
    "mahjong tile temple tuna nap priestess bell riichi dealer haneman win lose round table tea cat ear kimono "
    "festival lantern river bridge moon star rain umbrella book library harbour ship lighthouse market bread "
    "cherry blossom shrine fox spirit dragon sword shield castle garden pond koi frog song dance drum flute "
    "letter secret promise friend rival teacher student exam summer winter autumn spring snow fire ocean island"
).split()
FILLER = "i you the a and to it is that was we so but oh yes no really very just like".split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS if rng.random() < 0.35 else FILLER) for _ in range(rng.randint(8, 30))]
    return " ".join(words).capitalize() + "."


def build(url: str, messages: int, seed: int = 0) -> tuple[int, int]:
    """A stored world with one long conversation; returns (conversation id, character id)."""
    rng = random.Random(seed)
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    db = make_sessionmaker(engine)
    book = {
        "entries": [
            {"keys": [word], "content": f"Lore about the {word}: " + _sentence(rng), "insertion_order": i}
            for i, word in enumerate(WORDS[:40])
        ]
    }
    with db.begin() as session:
        user = User(platform="console", platform_user_id="bench", display_name="Ann", persona="A sailor from Kobe.")
        chat = Chat(platform="console", platform_chat_id="bench-dm")
        character = Character(
            name="Ichihime",
            description="The cat-eared priestess of the Mahjong Soul temple. " + _sentence(rng) * 3,
            greeting="Hello! My name is Ichihime. Glad to meet you-nyaa!",
            example_dialogues="\n".join(f"<START>\n{{{{user}}}}: {_sentence(rng)}\n{{{{char}}}}: {_sentence(rng)}"
                                        for _ in range(10)),
            style_notes="greedy, sleepy, proud",
            card={"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Ichihime", "character_book": book}},
        )
        session.add_all([user, chat, character])
        session.flush()
        conversation = Conversation(user_id=user.id, character_id=character.id, chat_id=chat.id)
        session.add(conversation)
        session.flush()
        rows = [
            {"conversation_id": conversation.id, "chat_id": chat.id, "role": ("user", "character")[i % 2],
             "text": _sentence(rng), "image_keys": [], "platform_reply_ids": []}
            for i in range(messages)
        ]
        session.execute(insert(Message), rows)
        for fact in ("Ann is afraid of thunder", "Ann's boat is called Heron", "Ann owes Ichihime three tuna"):
            memory.remember(session, conversation, fact)
        last = session.query(Message.id).order_by(Message.id.desc()).offset(40).limit(1).scalar()
        memory.store_summary(session, conversation.id, "Ann and Ichihime played many rounds. " + _sentence(rng), last)
        return conversation.id, character.id


def run(url: str, messages: int, iterations: int) -> dict[str, float]:
    """Times of prompt assembly in milliseconds (median, p95, max) and the one-off index build."""
    conversation_id, _ = build(url, messages)
    engine = make_engine(url)
    db = make_sessionmaker(engine)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]  # defaults: 4096-token context, 20-turn window
    tokenizer = tiny_tokenizer()
    count_tokens = lambda text: len(tokenizer.segment(text))  # noqa: E731 - CharacterModel.count_tokens
    rng = random.Random(1)
    with db.begin() as session:
        started = time.perf_counter()
        memory.index_chat(session, session.get(Conversation, conversation_id).chat_id)
        index_ms = (time.perf_counter() - started) * 1000
    if engine.dialect.name == "postgresql":  # what autovacuum does to a live database after a bulk load
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    times, cpu, tokens = [], [], 0
    for _ in range(iterations):
        with db.begin() as session:  # the chat service stores the user's turn
            conversation = session.get(Conversation, conversation_id)
            new = Message(conversation_id=conversation_id, chat_id=conversation.chat_id, role="user",
                          text=_sentence(rng))
            session.add(new)
            session.flush()
            new_id = new.id
        started, started_cpu = time.perf_counter(), time.process_time()
        with db.begin() as session:  # the worker assembles the prompt
            conversation = session.get(Conversation, conversation_id)
            prompt = assemble_prompt(session, conversation, session.get(Message, new_id), settings, count_tokens)
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
        tokens = prompt.tokens
        with db.begin() as session:  # and stores the reply
            session.add(Message(conversation_id=conversation_id, chat_id=conversation.chat_id, role="character",
                                text=_sentence(rng)))
    times.sort()
    return {
        "cpu_median_ms": statistics.median(cpu),
        "median_ms": statistics.median(times),
        "p95_ms": times[int(len(times) * 0.95) - 1],
        "max_ms": times[-1],
        "index_build_ms": index_ms,
        "prompt_tokens": tokens,
    }


def reference_loop_s() -> float:
    """CPU seconds of a plain Python loop (10M additions), to compare machines: about 0.45 s on an idle modern core."""
    started, total = time.process_time(), 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=at_least(1), default=10_000)
    parser.add_argument("--iterations", type=at_least(1), default=200)
    parser.add_argument("--database-url", default="", help="SQL store (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp, 'bench.db').as_posix()}"
        result = run(url, args.messages, args.iterations)
    print(
        f"{args.messages} messages, {args.iterations} replies, {url.split(':', 1)[0]}, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}: "
        f"median {result['median_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms, max {result['max_ms']:.2f} ms "
        f"(CPU time median {result['cpu_median_ms']:.2f} ms); "
        f"prompt {result['prompt_tokens']} tokens; one-off index build {result['index_build_ms']:.0f} ms; "
        f"reference loop {reference_loop_s():.2f} s CPU, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()

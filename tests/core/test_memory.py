"""Memory: window, summaries at the right size, facts, recall, commands, isolation, presence, export, forget-me."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core import memory
from core.db.models import (
    Base,
    Character,
    CharacterSubmission,
    Chat,
    Conversation,
    Job,
    Memory,
    Message,
    MessageTerm,
    Notification,
    SubmissionImage,
    TrainingJob,
    User,
)
from core.jobs import JobKind, JobState
from core.media import FileStore
from tests.conftest import make_settings
from tests.factories import image_bytes


def words(text_: str) -> int:
    """A whitespace token counter (with the two segment markers), enough where exact tokens do not matter."""
    return len(text_.split()) + 2


class World:
    """Rows of a small world built straight through the ORM."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def user(self, uid: str, name: str = "") -> User:
        return self._add(User(platform="console", platform_user_id=uid, display_name=name or uid.title()))

    def chat(self, cid: str, group: bool = False) -> Chat:
        return self._add(Chat(platform="console", platform_chat_id=cid, is_group=group))

    def character(self, name: str) -> Character:
        return self._add(Character(name=name, description=f"{name} is a test character."))

    def conversation(self, user: User, character: Character, chat: Chat) -> Conversation:
        return self._add(Conversation(user_id=user.id, character_id=character.id, chat_id=chat.id))

    def say(self, conversation: Conversation, text_: str, role: str = "user", images: list[str] | None = None) -> Any:
        return self._add(
            Message(conversation_id=conversation.id, chat_id=conversation.chat_id, role=role, text=text_,
                    image_keys=images or [])
        )

    def talk(self, conversation: Conversation, turns: int, start: int = 0) -> list[Message]:
        return [
            self.say(conversation, f"turn {i} about nothing much", "user" if i % 2 == 0 else "character")
            for i in range(start, start + turns)
        ]

    def _add(self, row: Any) -> Any:
        self.session.add(row)
        self.session.flush()
        return row


@pytest.fixture
def small(tmp_path):
    """Settings with a 4-turn window and a summary every 6 turns out of it."""
    return make_settings(tmp_path, history_messages=4, summary_every=6, recall_turns=3)


def test_window_holds_the_last_turns_before_the_new_message(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm-ann"))
        w.talk(conv, 10)
        new = w.say(conv, "hello again")
        context = memory.memory_context(session, conv, new, small)
        assert [t.text for t in context.window] == [f"turn {i} about nothing much" for i in range(6, 10)]
        assert [t.speaker for t in context.window] == ["Ann", "Mio", "Ann", "Mio"]


def test_summary_is_due_at_the_right_size_and_stored_once(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm-ann"))
        turns = w.talk(conv, 9)  # 5 out of the 4-turn window: not yet
        assert not memory.summary_due(session, conv, small)
        turns += w.talk(conv, 1, start=9)  # 6 out of the window: due
        assert memory.summary_due(session, conv, small)
        job = Job(kind=JobKind.SUMMARY, state=JobState.QUEUED, user_id=conv.user_id, conversation_id=conv.id)
        session.add(job)
        session.flush()
        assert not memory.summary_due(session, conv, small)  # one open job is enough
        request = memory.summary_request(session, conv, small, words)
        assert request.covers_until_message_id == turns[5].id
        prompt = request.segments[0].text
        assert "turn 5 about" in prompt and "turn 6 about" not in prompt and "Facts:" in prompt
        job.state = JobState.DONE
        answer = "Ann and Mio chatted about nothing much.\nFacts:\n- Ann likes green tea\n- none"
        assert memory.store_summary(session, conv.id, answer, request.covers_until_message_id)
        assert not memory.store_summary(session, conv.id, answer, request.covers_until_message_id)  # a re-run
        assert not memory.summary_due(session, conv, small)
        w.talk(conv, 5, start=10)
        assert not memory.summary_due(session, conv, small)
        w.talk(conv, 1, start=15)
        assert memory.summary_due(session, conv, small)
        follow_up = memory.summary_request(session, conv, small, words)
        assert "Ann and Mio chatted about nothing much." in follow_up.segments[0].text  # rolling: builds on it
        new = w.say(conv, "so?")
        context = memory.memory_context(session, conv, new, small)
        assert context.summary == "Ann and Mio chatted about nothing much."
        assert context.extracted == ["Ann likes green tea"]
        kinds = session.scalars(select(Memory.kind).where(Memory.conversation_id == conv.id)).all()
        assert kinds == ["summary"]


def test_summary_request_stays_within_the_context_budget(sessionmaker, tmp_path) -> None:
    settings = make_settings(tmp_path, history_messages=2, summary_every=2, context_tokens=600)
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm"))
        for i in range(40):
            w.say(conv, f"long turn {i} " + "blah " * 30)
        request = memory.summary_request(session, conv, settings, words)
        assert words(request.segments[0].text) <= 600 - memory.SUMMARY_REPLY_TOKENS
        assert request.covers_until_message_id < session.scalar(select(Message.id).order_by(Message.id.desc()))


def test_empty_summary_is_not_stored(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm"))
        w.talk(conv, 12)
        assert not memory.store_summary(session, conv.id, "  \nFacts: none", 3)
        assert memory.summary_due(session, conv, small)


def test_recall_finds_relevant_old_turns_outside_the_window(any_sessionmaker, small) -> None:
    with any_sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm"))
        w.say(conv, "My grandmother's cottage is in Kyoto, near the river.")
        w.say(conv, "Kyoto sounds lovely.", "character")
        w.say(conv, "I adopted two cats last spring.")
        w.talk(conv, 20)
        new = w.say(conv, "Do you remember where my grandmother lives?")
        context = memory.memory_context(session, conv, new, small)
        assert context.recalled[0].text.startswith("My grandmother's cottage")
        assert all("cats" not in t.text for t in context.recalled)
        window_ids = {t.message_id for t in context.window}
        assert window_ids.isdisjoint(t.message_id for t in context.recalled)
        assert memory.recall(session, conv, "cat", before_id=new.id, limit=3)[0].text.startswith("I adopted")
        assert memory.recall(session, conv, "the and of", before_id=new.id, limit=3) == []


def test_recall_indexes_late_turns_and_survives_a_second_indexer(any_sessionmaker, small) -> None:
    with any_sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm"))
        w.talk(conv, 5)
        assert memory.index_chat(session, conv.chat_id) == 5
        assert memory.index_chat(session, conv.chat_id) == 0
        late = w.say(conv, "zebra crossing")
        session.execute(text("UPDATE messages SET id = 0 WHERE id = :id"), {"id": late.id})  # committed "late"
        session.expire_all()
        assert memory.index_chat(session, conv.chat_id) == 1
        assert session.scalar(select(MessageTerm.message_id).where(MessageTerm.term == "zebra")) == 0


def test_two_users_never_see_each_others_memory(any_sessionmaker, small) -> None:
    with any_sessionmaker.begin() as session:
        w = World(session)
        mio = w.character("Mio")
        ann, bob = w.user("ann"), w.user("bob")
        a = w.conversation(ann, mio, w.chat("dm-ann"))
        b = w.conversation(bob, mio, w.chat("dm-bob"))
        memory.remember(session, a, "My password is swordfish")
        memory.persona(session, ann, "A spy from Lisbon.")
        w.say(a, "The swordfish code opens the vault in Lisbon.")
        w.talk(a, 8)
        memory.store_summary(session, a.id, "Ann told Mio about the vault.\nFacts:\n- Ann is a spy", 1)
        w.talk(b, 8)
        new = w.say(b, "What is the swordfish password to the vault in Lisbon?")
        context = memory.memory_context(session, b, new, small)
        seen = json.dumps([context.window, context.recalled, context.pinned, context.extracted, context.summary],
                          default=str)
        assert "swordfish" not in seen.replace(new.text, "") and "vault" not in seen.replace(new.text, "")
        assert context.pinned == [] and context.extracted == [] and context.summary == ""
        shown = memory.describe_memory(session, b)
        assert "swordfish" not in shown and "Lisbon" not in shown and "spy" not in shown
        assert "opens the vault" not in json.dumps(memory.export_user(session, bob.id))
        assert "password is swordfish" not in json.dumps(memory.export_user(session, bob.id))
        assert "opens the vault" in json.dumps(memory.export_user(session, ann.id))


def test_group_scene_knowledge_is_scoped_by_presence(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        ann, bob = w.user("ann"), w.user("bob")
        mio, rin = w.character("Mio"), w.character("Rin")
        tavern, harbour = w.chat("tavern", group=True), w.chat("harbour", group=True)
        ann_mio = w.conversation(ann, mio, tavern)
        w.say(ann_mio, "The treasure is buried under the old oak tree.")
        w.say(ann_mio, "I will guard the secret of the oak.", "character")
        bob_rin = w.conversation(bob, rin, tavern)  # Rin arrives in the tavern now
        w.say(bob_rin, "Hello Rin, welcome to the tavern.")
        w.say(ann_mio, "The silver key is hidden in the blue vase.")
        w.talk(ann_mio, 10)
        w.talk(bob_rin, 10)

        def knows(conv: Conversation, query: str) -> str:
            new = w.say(conv, query)
            context = memory.memory_context(session, conv, new, small)
            return " ".join(t.text for t in context.window + context.recalled)

        rin_heard = knows(bob_rin, "treasure oak silver key vase?")
        assert "blue vase" in rin_heard  # said in the tavern after Rin arrived
        assert "treasure" not in rin_heard  # said before Rin was there
        bob_mio = w.conversation(bob, mio, tavern)
        assert "treasure is buried" in knows(bob_mio, "Where is the treasure buried?")  # Mio was present
        ann_mio_harbour = w.conversation(ann, mio, harbour)
        assert "treasure" not in knows(ann_mio_harbour, "Where is the treasure buried?")  # another chat
        ann_rin_dm = w.conversation(ann, rin, w.chat("dm-ann"))
        assert "vase" not in knows(ann_rin_dm, "Where is the silver key?")


def test_commands(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        ann = w.user("ann")
        conv = w.conversation(ann, w.character("Mio"), w.chat("dm"))
        assert "Tell me what to remember" in memory.remember(session, conv, "  ")
        assert memory.remember(session, conv, "I am  allergic to cats") == "I will remember: I am allergic to cats"
        assert memory.remember(session, conv, "i am allergic to CATS") == "I already remember that."
        assert "at most" in memory.remember(session, conv, "x" * 501)
        memory.remember(session, conv, "My birthday is in May")
        assert "You have no persona" in memory.persona(session, ann, "")
        assert memory.persona(session, ann, "A baker from Lyon.") == "Your persona is now: A baker from Lyon."
        shown = memory.describe_memory(session, conv)
        assert "1. I am allergic to cats" in shown and "2. My birthday is in May" in shown and "Lyon" in shown
        assert memory.forget(session, conv, "1") == "Forgotten: I am allergic to cats"
        assert "Use /forget N" in memory.forget(session, conv, "7")
        assert memory.forget(session, conv, "all") == "Forgotten: 1 fact."
        assert memory.forget(session, conv, "all") == "There was nothing to forget."
        assert memory.persona(session, ann, "clear") == "Your persona is cleared."
        assert "/forget me confirm" in memory.forget(session, conv, "me")
        assert session.get(User, ann.id) is not None  # nothing deleted before the confirmation


def _rows_mentioning(session: Session, needles: list[str]) -> list[str]:
    """Every row of every table whose text mentions one of ``needles``."""
    found = []
    for table in Base.metadata.sorted_tables:
        for row in session.execute(select(table)).mappings():
            dump = json.dumps({k: v for k, v in row.items()}, default=str)
            found += [f"{table.name}: {needle}" for needle in needles if needle in dump]
    return found


def _populate(session: Session, store: FileStore, settings) -> dict[str, Any]:
    w = World(session)
    eve, bob = w.user("eve-4242", "Evelyn"), w.user("bob")
    mio = w.character("Mio")
    dm, tavern = w.chat("dm-eve-4242"), w.chat("tavern", group=True)
    eve.persona = "Evelyn the astronomer"
    own = store.put(image_bytes("PNG", (20, 20)), ".png")
    shared = store.put(image_bytes("PNG", (30, 30)), ".png")
    conv = w.conversation(eve, mio, dm)
    first = w.say(conv, "my telescope is named Orion", images=[own, shared])
    w.say(conv, "Orion is a fine name", "character")
    group = w.conversation(eve, mio, tavern)
    w.say(group, "Evelyn's comet secret")
    bobs = w.conversation(bob, mio, tavern)
    w.say(bobs, "bob was here", images=[shared])
    memory.remember(session, conv, "Evelyn's favourite star is Vega")
    memory.store_summary(session, conv.id, "Evelyn talked about Orion.\nFacts:\n- Evelyn owns a telescope", first.id)
    memory.recall(session, conv, "telescope", before_id=first.id + 10, limit=2)  # builds the index
    memory.recall(session, bobs, "bob", before_id=first.id + 10, limit=2)
    job = Job(kind=JobKind.CHAT, user_id=eve.id, conversation_id=conv.id, request_message_id=first.id)
    session.add(job)
    eve.active_character_id = mio.id
    mine = w._add(Character(name="EveBot", description="A character she made", creator_id=eve.id))
    sub = w._add(CharacterSubmission(user_id=eve.id, name="Nova", description="Evelyn's submission"))
    sub_key = store.put(image_bytes("PNG", (40, 40)), ".png")
    w._add(SubmissionImage(submission_id=sub.id, file_key=sub_key, phash="ab", width=40, height=40))
    w._add(TrainingJob(submission_id=sub.id))
    w._add(Notification(user_id=eve.id, platform="console", submission_id=sub.id, kind="submitted",
                        text="Evelyn, thanks"))
    return {"eve": eve.id, "bob": bob.id, "own": own, "shared": shared, "sub_key": sub_key, "mine": mine.id}


def test_forget_me_leaves_no_row_of_the_user_in_any_table(any_sessionmaker, tmp_path) -> None:
    settings = make_settings(tmp_path)
    store = FileStore(settings.files_dir)
    with any_sessionmaker.begin() as session:
        ids = _populate(session, store, settings)
        conv = session.scalars(select(Conversation).where(Conversation.user_id == ids["eve"])).first()
        assert "Done" in memory.forget(session, conv, "me confirm", store)
        assert store.exists(ids["own"])  # files go only once the deletion is committed
    with any_sessionmaker() as session:
        assert _rows_mentioning(session, ["Evelyn", "eve-4242", "Orion", "telescope", "Vega", ids["own"]]) == []
        for table in Base.metadata.sorted_tables:  # and no column anywhere points at the user any more
            for fk in table.foreign_keys:
                if fk.column.table.name == "users":
                    assert not session.execute(select(table).where(fk.parent == ids["eve"])).first(), table.name
        orphan_terms = session.execute(
            select(MessageTerm).where(MessageTerm.message_id.not_in(select(Message.id)))
        ).first()
        assert orphan_terms is None
        assert session.get(User, ids["bob"]) is not None
        assert session.scalars(select(Message.text)).all() == ["bob was here"]
        assert session.get(Character, ids["mine"]).creator_id is None  # the character stays, unlinked
        assert session.scalar(select(Chat.platform_chat_id)) == "tavern"  # her DM chat is gone, the group stays
    assert not store.exists(ids["own"]) and not store.exists(ids["sub_key"])
    assert store.exists(ids["shared"])  # still used by Bob's message


def test_forget_me_rolled_back_keeps_rows_and_files(sessionmaker, tmp_path) -> None:
    settings = make_settings(tmp_path)
    store = FileStore(settings.files_dir)
    with sessionmaker.begin() as session:
        ids = _populate(session, store, settings)
    with pytest.raises(RuntimeError), sessionmaker.begin() as session:
        memory.forget_user(session, ids["eve"], store)
        raise RuntimeError("the transaction fails after the deletion")
    with sessionmaker() as session:
        assert session.get(User, ids["eve"]) is not None
    assert store.exists(ids["own"])


def test_export_is_json(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        ann = w.user("ann")
        conv = w.conversation(ann, w.character("Mio"), w.chat("dm"))
        w.say(conv, "hi")
        memory.remember(session, conv, "I like tea")
        exported = json.loads(json.dumps(memory.export_user(session, ann.id)))
        assert exported["user"]["id"] == "ann"
        assert exported["conversations"][0]["messages"][0]["text"] == "hi"
        assert exported["memories"] == [
            {"kind": "pinned", "character": "Mio", "text": "I like tea", "at": exported["memories"][0]["at"]}
        ]
        with pytest.raises(LookupError):
            memory.export_user(session, 999)


def test_terms_fold_case_plurals_stopwords_and_cjk() -> None:
    assert memory.terms("The Cats and the DOG's toys") == ["cat", "dog", "toy"]
    assert memory.terms("東京タワー") == ["東京", "京タ", "タワ", "ワー"]
    assert memory.terms("a I ok") == []



def test_unsummarised_read_with_the_window_agrees_with_the_database(sessionmaker, small) -> None:
    # the reply's transaction trusts MemoryContext.unsummarised instead of counting: both must say the same
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm-ann"))
        for n in range(20):
            new = w.say(conv, f"message {n}")
            context = memory.memory_context(session, conv, new, small, index=False)
            w.say(conv, f"reply {n}", "character")  # the reply is stored, then the summary is checked
            counted = memory.summary_due(session, conv, small)
            assert memory.summary_due(session, conv, small, context.unsummarised) == counted, n
            if counted:
                answer = f"Summary up to {n}.\nFacts: none"
                request = memory.summary_request(session, conv, small, words)
                assert memory.store_summary(session, conv.id, answer, request.covers_until_message_id)


def test_memory_read_without_indexing_writes_nothing(sessionmaker, small) -> None:
    with sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm-ann"))
        w.say(conv, "the lighthouse keeper has a blue lantern")
        w.talk(conv, 6)
        new = w.say(conv, "tell me about the blue lantern")
        context = memory.memory_context(session, conv, new, small, index=False)
        assert context.recalled == [] and session.scalar(select(func.count()).select_from(MessageTerm)) == 0
        assert memory.index_due(context, small)  # the reply's transaction indexes the chat
        memory.index_chat(session, conv.chat_id)
        later = memory.memory_context(session, conv, new, small, index=False)
        assert later.recalled[0].text == "the lighthouse keeper has a blue lantern"  # best first


def test_a_reply_indexes_its_turns_and_any_a_failed_job_left(any_sessionmaker, small) -> None:
    with any_sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm-ann"))
        w.talk(conv, 6)
        memory.index_chat(session, conv.chat_id)  # earlier replies indexed what came before
        orphan = w.say(conv, "the red kite flew over the harbour")  # its reply failed: never indexed
        new = w.say(conv, "do you remember the kite?")
        context = memory.memory_context(session, conv, new, small, index=False)
        reply = w.say(conv, "A red kite, yes.", "character")
        memory.index_reply(session, conv, context, new, reply.id, reply.text, small)
        indexed = session.scalars(select(MessageTerm.message_id).where(MessageTerm.term == memory.DOCUMENT)).all()
        assert {orphan.id, new.id, reply.id} <= set(indexed)
        assert memory.index_chat(session, conv.chat_id) == 0  # nothing was left for the catch-up


def test_postings_already_there_are_kept_and_the_rest_added(any_sessionmaker) -> None:
    with any_sessionmaker.begin() as session:
        w = World(session)
        conv = w.conversation(w.user("ann"), w.character("Mio"), w.chat("dm"))
        first, second = w.say(conv, "kites and the harbour"), w.say(conv, "a harbour of kites")
        memory._index(session, conv.chat_id, [(first.id, conv.id, first.text)])
        # the first turn again with other counts (another indexer got there first), the second twice in one call
        again = [(first.id, conv.id, "kites, kites and the harbour"), *[(second.id, conv.id, second.text)] * 2]
        memory._index(session, conv.chat_id, again)
        rows = session.execute(select(MessageTerm.message_id, MessageTerm.term, MessageTerm.count)).all()
    assert sorted(rows) == sorted([
        (first.id, "", 0), (first.id, "kite", 1), (first.id, "harbour", 1),
        (second.id, "", 0), (second.id, "harbour", 1), (second.id, "kite", 1),
    ])

"""Image policy, ask detection, auto spacing, quotas, safety and scene conditioning (issue 8)."""

from __future__ import annotations

import pytest
from PIL import Image

from core.config import Settings
from core.db.models import Character, Chat, Job, User
from core.imaging import (
    ImagePolicy,
    auto_allowed,
    check_request,
    detect_ask,
    image_block_tokens,
    resolve_policy,
    scene_contexts,
)
from core.jobs import JobKind, JobState
from core.model.api import ImageSegment, TextSegment
from core.model.roleplay import Thinking

ASKS = [
    ("send me a pic", "self"),
    ("selfie?", "self"),
    ("show me what you're wearing", "self"),
    ("draw us at the beach", "scene"),
    ("can I see a picture of you?", "self"),
    ("pic pls", "self"),
    ("what do you look like?", "self"),
    ("show me your cat", "thing"),
    ("take a selfie for me!", "self"),
    ("could you send a photo of your room", "thing"),
    ("let me see your new outfit", "self"),
    ("draw me a picture of us together", "scene"),
    ("I want to see you in the snow", "self"),
    ("paint the view from here", "scene"),
    ("another pic of you from today?", "self"),
    ("can we get a photo of the two of us?", "scene"),
    ("show us the temple", "thing"),
    ("snap a photo of your lunch", "thing"),
]
NON_ASKS = [
    "hello, how are you today?",
    "I saw a picture of a cat yesterday",
    "don't send me any pictures please",
    "my photo album is full of beach shots",
    "what's your favourite food?",
    "drawing is my hobby",
    "tell me a story about the temple",
    "I took a selfie last night",
    "we won the mahjong round!",
    "no pics, just talk to me",
    "did you sleep well?",
    "I love the way you talk",
]


def _rates(predicted: list[bool], expected: list[bool]) -> tuple[float, float]:
    tp = sum(p and e for p, e in zip(predicted, expected))
    fp = sum(p and not e for p, e in zip(predicted, expected))
    fn = sum(e and not p for p, e in zip(predicted, expected))
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def test_ask_detection_precision_and_recall() -> None:
    texts = [t for t, _ in ASKS] + NON_ASKS
    expected = [True] * len(ASKS) + [False] * len(NON_ASKS)
    verdicts = [detect_ask(t) for t in texts]
    precision, recall = _rates([v.asked for v in verdicts], expected)
    print(f"ask detection over {len(texts)} phrasings: precision {precision:.2f}, recall {recall:.2f}")
    assert len(texts) >= 30
    assert precision >= 0.9 and recall >= 0.85, [(t, v) for t, v, e in zip(texts, verdicts, expected) if v.asked != e]


@pytest.mark.parametrize(("text", "subject"), ASKS)
def test_ask_subject(text: str, subject: str) -> None:
    assert detect_ask(text).subject == subject


class _YesNoModel:
    """A double that answers the yes/no question with a fixed word and records that it was asked."""

    def __init__(self, answer: str) -> None:
        self.answer, self.asked = answer, 0

    def generate_text(self, context, params, on_text=None, adapter=None) -> str:  # type: ignore[no-untyped-def]
        self.asked += 1
        assert params.temperature == 0.0 and isinstance(context[0], TextSegment)
        return self.answer


def test_unclear_messages_go_to_the_model_and_clear_ones_do_not() -> None:
    unclear = "what are you wearing today?"  # a question about looks: maybe a request, maybe small talk
    yes, no = _YesNoModel(" yes"), _YesNoModel("No.")
    assert detect_ask(unclear, yes).decided_by == "model" and detect_ask(unclear, yes).asked
    assert not detect_ask(unclear, no).asked
    clear = _YesNoModel("yes")
    assert not detect_ask("what's your favourite food?", clear).asked and clear.asked == 0
    assert detect_ask("send me a pic", clear).asked and clear.asked == 0
    garbled = _YesNoModel("qz!")
    verdict = detect_ask(unclear, garbled)
    assert verdict.decided_by == "lexicon" and verdict.asked == (verdict.score >= 0.5)


def test_policy_chat_wins_over_card() -> None:
    character = Character(name="A", image_policy="auto")
    assert resolve_policy(character, None) is ImagePolicy.AUTO
    assert resolve_policy(character, Chat(image_policy="never")) is ImagePolicy.NEVER
    assert resolve_policy(character, Chat(image_policy=None)) is ImagePolicy.AUTO


def test_auto_needs_an_instruction_and_spacing(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, auto_image_every=3)
    plan = Thinking("the user asked about the beach", "Ichihime on a sunny beach, anime style")
    assert auto_allowed(plan, None, settings)
    assert not auto_allowed(plan, 2, settings)
    assert auto_allowed(plan, 3, settings)
    assert not auto_allowed(Thinking("nothing to show", ""), None, settings)


def test_quota_and_safety(tmp_path, sessionmaker) -> None:
    sqlite_session = sessionmaker()
    settings = Settings(data_dir=tmp_path, image_quota_user_per_day=2, image_banned_words="gore")
    character = Character(name="Ichihime")
    chat = Chat(platform="console", platform_chat_id="c", nsfw_allowed=False)
    user, other = User(platform="console", platform_user_id="u"), User(platform="console", platform_user_id="v")
    sqlite_session.add_all([character, chat, user, other])
    sqlite_session.flush()
    check = lambda prompt: check_request(  # noqa: E731
        sqlite_session, settings, prompt=prompt, user_id=user.id, chat=chat, character=character
    )
    assert check("a picture of you at the beach") is None
    assert "not allow" in check("lots of gore")
    assert "adult" in check("a nude picture").lower()
    for state in (JobState.DONE, JobState.QUEUED, JobState.FAILED):
        sqlite_session.add(Job(kind=JobKind.IMAGE, state=state, user_id=user.id, params={"chat_id": chat.id}))
    sqlite_session.flush()
    assert "2 pictures" in check("a picture of you at the beach")  # the failed one does not count
    character.real_person = True
    settings = Settings(data_dir=tmp_path)
    assert "consent" in check_request(sqlite_session, settings, prompt="x", user_id=other.id, chat=chat, character=character)


def test_scene_contexts_condition_on_turns_reply_and_references() -> None:
    refs = [Image.new("RGB", (256, 256), c) for c in ("red", "green", "blue")]
    one_ref = image_block_tokens(256, 256)
    ctx = scene_contexts(
        description="A priestess with cat ears.",
        history=[("User", "Let's go to the beach!")],
        user_text="draw us there",
        reply="Nyaa~ the sea is so sparkly!",
        references=refs,
        budget_tokens=2 * one_ref,
        subject="scene",
    )
    *images, text = ctx.cond
    assert [type(s) for s in images] == [ImageSegment, ImageSegment] and all(s.vae and s.vit for s in images)
    assert isinstance(text, TextSegment)
    for part in ("Let's go to the beach!", "draw us there", "the sea is so sparkly", "cat ears", "the user in it"):
        assert part in text.text
    assert list(ctx.text_uncond) == images and list(ctx.image_uncond or []) == [text]
    bare = scene_contexts(
        description="d", history=[], user_text="selfie?", reply="here!", references=refs, budget_tokens=0
    )
    assert bare.image_uncond is None and len(bare.cond) == 1 and bare.text_uncond == []

"""A chat or image worker has its model loaded before it takes a job; one it cannot load stops it with the reason."""

from __future__ import annotations

import dataclasses

import pytest

import workers.context
from tests.doubles import EchoModel
from unichar import cli
from workers import celery_app
from workers.celery_app import ModelUnavailable, app, start_worker
from workers.shared_model import SharedModel


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What happened, in order: "model loaded", "worker started"; the worker itself is not run."""
    events: list[str] = []
    monkeypatch.setattr(app, "worker_main", lambda argv: events.append("worker started"))
    monkeypatch.setitem(app.conf, "broker_transport_options", {})  # not bound to another test's database
    return events


def _install(monkeypatch: pytest.MonkeyPatch, ctx, loader) -> None:
    monkeypatch.setattr(workers.context, "_context", dataclasses.replace(ctx, model=SharedModel(loader)))


def test_the_model_is_loaded_before_the_worker_takes_jobs(monkeypatch, ctx, started: list[str]) -> None:
    _install(monkeypatch, ctx, lambda: started.append("model loaded") or EchoModel())
    start_worker(ctx.settings, ["chat", "image"])
    assert started == ["model loaded", "worker started"]


def test_a_train_worker_loads_no_serving_model(monkeypatch, ctx, started: list[str]) -> None:
    _install(monkeypatch, ctx, lambda: started.append("model loaded") or EchoModel())
    start_worker(ctx.settings, ["train"])
    assert started == ["worker started"]


def test_a_model_that_cannot_be_loaded_stops_the_worker_with_the_reason(monkeypatch, ctx, started) -> None:
    def missing() -> EchoModel:
        raise FileNotFoundError("llm_config.json is missing in /models/bagel")

    _install(monkeypatch, ctx, missing)
    with pytest.raises(ModelUnavailable, match="llm_config.json is missing in /models/bagel"):
        start_worker(ctx.settings, ["chat"])
    assert started == []


def test_the_cli_says_why_in_one_line(monkeypatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ModelUnavailable("the model cannot be loaded: llm_config.json is missing in /models/bagel")

    monkeypatch.setenv("UNICHAR_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(celery_app, "start_worker", refuse)
    assert cli.main(["worker", "--queues", "chat"]) == 2
    err = capsys.readouterr().err
    assert "llm_config.json is missing in /models/bagel" in err and "Traceback" not in err

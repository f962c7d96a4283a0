"""``unichar admin queue list|show|approve|reject|cancel|retry|publish``: the submission queue from the shell.

The operator at the shell acts as platform ``cli`` (audited as ``cli:<login>``). Approve and retry send the train
task after commit; when the broker is down the sweeper sends it later, since the queued Job row is the truth.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from core.config import Settings
from core.db.installation import SchemaNotReady, installation_token
from core.db.session import make_engine, make_sessionmaker
from core.jobs import JobKind
from core.media import FileStore
from core.submissions import Actor, QueueItem, SubmissionError, Submissions
from core.wording import counted

__all__ = ["add_subparsers", "format_item"]

log = logging.getLogger(__name__)

_OPEN = ("pending", "approved", "training", "evaluated", "failed")
_ALL = _OPEN + ("published", "rejected", "cancelled", "withdrawn")


def _train_sender(settings: Settings, installation: str) -> Callable[[int], None]:
    """Sends a train task now, to the settings' broker; if it is unreachable the sweeper re-sends the queued job."""
    from workers.celery_app import create_app
    from workers.tasks import dispatcher

    dispatch = dispatcher(installation, create_app(settings))

    def send(job_id: int) -> None:
        try:
            dispatch(job_id, JobKind.TRAIN)  # the train queue: training never sits in front of a chat reply
        except Exception as error:  # the row is queued either way
            log.warning("could not send job %s now (%s); the sweeper will send it", job_id, error)

    return send


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def format_item(item: QueueItem) -> str:
    """One queue line: id, state, name, submitter, images, training progress and ETA."""
    progress = ""
    if item.total_steps and item.state in ("approved", "training", "evaluated", "failed"):
        loss = f" loss {item.loss:.4f}" if item.loss is not None else ""
        progress = f"  {item.percent:5.1f}% ({item.step}/{item.total_steps}) ETA {_eta(item.eta_s)}{loss}"
    reason = f"  ({item.reason})" if item.reason else ""
    return (
        f"#{item.id:<5} {item.state:<10} {item.name!r:<24} by {item.submitter:<20} "
        f"{counted(item.images, 'image')}  {item.created_at}{progress}{reason}"
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Open the stores, do the one queue action in one transaction, print the outcome."""
    who = Actor("cli", getpass.getuser())
    db = make_sessionmaker(make_engine(settings.sql_url))
    try:
        dispatch = _train_sender(settings, installation_token(db))
        service = Submissions(settings, FileStore(settings.files_dir), dispatch=dispatch)
        with db.begin() as session:
            print(_act(args, settings, service, who, session))
    except (SubmissionError, SchemaNotReady) as error:
        print(f"unichar: {error}", file=sys.stderr)
        return 2
    return 0


def _act(args: argparse.Namespace, settings: Settings, service: Submissions, who: Actor, session) -> str:  # type: ignore[no-untyped-def]
    action = args.queue_action
    if action == "list":
        items = service.queue(session, who, states=_ALL if args.all else _OPEN)
        return "\n".join(format_item(i) for i in items) or "The queue is empty."
    if action == "show":
        view = service.inspect(session, who, args.id)
        sheet = Path(args.sheet or settings.data_dir / f"submission-{args.id}.png")
        lines = [format_item(view.item), "", "Description:", view.description, "", "Greeting:", view.greeting, ""]
        lines.append(f"Real person: {'yes' if view.real_person else 'no'}; consent: {view.consent_text or '-'}")
        if view.contact_sheet_png:
            sheet.parent.mkdir(parents=True, exist_ok=True)
            sheet.write_bytes(view.contact_sheet_png)
            lines.append(f"Contact sheet: {sheet}")
        if view.report:
            lines.append("Evaluation: " + ", ".join(f"{k} {v}" for k, v in sorted(view.report.items())))
        return "\n".join(lines)
    if action == "approve":
        return f"Approved #{args.id}; train job {service.approve(session, who, args.id)} queued."
    if action == "reject":
        service.reject(session, who, args.id, " ".join(args.reason))
        return f"Rejected #{args.id}."
    if action == "cancel":
        service.admin_cancel(session, who, args.id, " ".join(args.reason))
        return f"Cancelled #{args.id}."
    if action == "publish":
        character = service.publish(session, who, args.id)
        return f"Published {character.name!r} (adapter version {character.adapter_version})."
    return f"Retrying #{args.id}; train job {service.retry(session, who, args.id)} queued."


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``admin queue list|show|approve|reject|cancel|retry`` on the ``unichar`` command."""
    admin = subparsers.add_parser("admin", help="admin tools: the character submission queue")
    groups = admin.add_subparsers(dest="admin_command", required=True, metavar="GROUP")
    queue = groups.add_parser("queue", help="review character submissions and follow their training")
    actions = queue.add_subparsers(dest="queue_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="submissions waiting for review or training, with progress and ETA")
    listing.add_argument("--all", action="store_true", help="include finished submissions")
    show = actions.add_parser("show", help="persona text, consent, evaluation; writes the images' contact sheet")
    show.add_argument("id", type=int)
    show.add_argument("--sheet", help="where to write the contact sheet PNG (default: data_dir/submission-ID.png)")
    actions.add_parser("approve", help="queue the character's training").add_argument("id", type=int)
    reject = actions.add_parser("reject", help="refuse a pending submission, telling the submitter why")
    reject.add_argument("id", type=int)
    reject.add_argument("reason", nargs="+", help="what the submitter is told")
    cancel = actions.add_parser("cancel", help="stop a queued or running training")
    cancel.add_argument("id", type=int)
    cancel.add_argument("reason", nargs="*", help="optional note for the submitter")
    actions.add_parser("publish", help="publish a trained character after reading its evaluation").add_argument(
        "id", type=int
    )
    actions.add_parser("retry", help="queue a failed training again (resumes from its checkpoint)").add_argument(
        "id", type=int
    )
    admin.set_defaults(handler=_run)

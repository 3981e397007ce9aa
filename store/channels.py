"""Channels and who may see them: the one rule for what may train the model everyone uses.

A channel's messages, and everything taught from them, may train the shared model only when the
channel is public to the whole workspace, or an admin opted it in (`/flywheel share #channel`,
audited by the caller). Private channels, group DMs, DMs, Slack Connect channels and channels
Slack would not describe stay where they were said; a channel the bot never recorded counts as
private."""
from __future__ import annotations

from sqlmodel import Session, col, select

from store.memory import touch_memory_item
from store.models import Channel, MemoryItem, Visibility, utcnow


def record_channel_visibility(session: Session, channel: str, visibility: Visibility | str) -> Channel:
    """What Slack says of `channel` now (the bot calls this when it looks the channel up). A
    channel that stops being public also takes back, from everyone else, the memory items taught
    in it while it was public."""
    row = session.get(Channel, channel)
    was_public = row is not None and row.visibility == Visibility.public
    if row is None:
        row = Channel(id=channel)
    row.visibility, row.checked_at = str(visibility), utcnow()
    session.add(row)
    if was_public and row.visibility != Visibility.public:
        _restrict_memory(session, channel)
    session.commit()
    session.refresh(row)
    return row


def _restrict_memory(session: Session, channel: str) -> None:
    stmt = select(MemoryItem).where(MemoryItem.channel == channel, col(MemoryItem.visible_in).is_(None))
    for item in session.exec(stmt).all():
        item.visible_in = channel
        touch_memory_item(session, item)
        session.add(item)


def set_training_share(session: Session, channel: str, *, shared: bool, by: str) -> Channel:
    """An admin's opt-in (or opt-out) of a non-public channel into training the shared model."""
    row = session.get(Channel, channel) or Channel(id=channel)
    row.shared_for_training = shared
    row.shared_by, row.shared_at = (by, utcnow()) if shared else (None, None)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def get_channel(session: Session, channel: str) -> Channel | None:
    return session.get(Channel, channel)


def shared_channels(session: Session) -> list[Channel]:
    """Non-public channels an admin opted into training."""
    stmt = select(Channel).where(col(Channel.shared_for_training)).order_by(col(Channel.id))
    return list(session.exec(stmt).all())


def may_train(row: Channel | None) -> bool:
    """The rule: public to the whole workspace, or opted in by an admin."""
    return row is not None and (row.visibility == Visibility.public or row.shared_for_training)


def training_scope(session: Session, channel: str | None) -> str | None:
    """An example's `visible_in`: None (may train the shared model) or the channel it stays in.
    Examples with no channel (imports, golden items an admin wrote) are curated: None."""
    if channel is None:
        return None
    return None if may_train(session.get(Channel, channel)) else channel

"""Regenerate / Accept / Delete under a generated image: persistent buttons only the requester can press.

The ``custom_id`` carries everything a press needs (``uc:img:<action>:<job id>:<user id>``), so a button works
after a restart with no state in memory: the bot registers :class:`ImageButton` once with ``add_dynamic_items`` and
discord.py rebuilds it from the id. The view has no timeout.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Protocol

import discord

if TYPE_CHECKING:
    from typing import Self

__all__ = ["ACTIONS", "ImageActions", "ImageButton", "image_view"]

ACTIONS: Final = {
    "regen": ("Regenerate", "🔁", discord.ButtonStyle.primary),
    "accept": ("Accept", "✅", discord.ButtonStyle.success),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
}
NOT_YOURS: Final = "Only the person who asked for this picture can use its buttons."


class ImageActions(Protocol):
    """What the bot does when a button is pressed (the interaction is not yet answered)."""

    async def regenerate_image(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def accept_image(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def delete_image(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...


class ImageButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"uc:img:(?P<action>regen|accept|delete):(?P<job>\d+):(?P<user>\d+)",
):
    """One of the three image buttons, rebuilt from its custom_id on every press."""

    def __init__(self, action: str, job_id: int, user_id: int) -> None:
        label, emoji, style = ACTIONS[action]
        button: discord.ui.Button[Any] = discord.ui.Button(
            label=label, emoji=emoji, style=style, custom_id=f"uc:img:{action}:{job_id}:{user_id}"
        )
        super().__init__(button)
        self.action, self.job_id, self.user_id = action, job_id, user_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(match["action"], int(match["job"]), int(match["user"]))

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Refuse, privately, anyone but the requester."""
        if interaction.user.id == self.user_id:
            return True
        await interaction.response.send_message(NOT_YOURS, ephemeral=True)
        return False

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        actions: ImageActions = interaction.client  # type: ignore[assignment]
        handler = {
            "regen": actions.regenerate_image,
            "accept": actions.accept_image,
            "delete": actions.delete_image,
        }[self.action]
        await handler(interaction, self.job_id)


def image_view(job_id: int, user_id: int, actions: tuple[str, ...] = tuple(ACTIONS)) -> discord.ui.View:
    """A timeout-free view with the buttons of one generated image."""
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(ImageButton(action, job_id, user_id))
    return view

"""The Telegram frontend on python-telegram-bot 22: a thin adapter over ``core.chat`` and ``bots.delivery``."""

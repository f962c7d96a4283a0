"""The Discord frontend: characters in channels, threads and DMs on discord.py (entry point: ``app.main``)."""

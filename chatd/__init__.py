"""chatd: a WebSocket chat and message-push daemon on Twisted and Autobahn."""

__version__ = "0.1.0"

"""chatd: a WebSocket chat and message-push daemon on Twisted and Autobahn."""

# The one place the version is written: setup.py reads it, ``twistd chatd
# --version``, /healthz, the start-up log line and the webhooks' User-Agent show it.
__version__ = "1.0.0"

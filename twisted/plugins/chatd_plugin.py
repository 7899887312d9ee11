"""Makes ``twistd chatd`` find chatd (twisted.plugins must have no __init__.py)."""

from twisted.application.service import ServiceMaker

chatd = ServiceMaker("chatd", "chatd.tap", "WebSocket chat and message push.", "chatd")

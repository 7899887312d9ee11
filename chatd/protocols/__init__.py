"""Thin WebSocket front ends over the hub: one module per wire protocol."""

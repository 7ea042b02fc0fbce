"""Cube: a self-hosted, E2B-compatible sandbox service running every sandbox as a KVM microVM."""

__version__ = "0.1.0"

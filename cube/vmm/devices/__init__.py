"""Emulated devices, one module each, each with a msgspec state struct for snapshots."""

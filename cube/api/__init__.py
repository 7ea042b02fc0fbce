"""The E2B control-plane API and the sandbox traffic proxy (Quart on Hypercorn)."""

"""Templates, the warm pool and the sandbox lifecycle (timeouts, pause/resume, fork)."""

"""What runs inside the guest: init, the envd-compatible agent, the code interpreter."""

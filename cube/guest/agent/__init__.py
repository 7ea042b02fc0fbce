"""The guest agent: envd's protocol for the E2B SDK, the vsock port relay and the control port.

One trio process serves three listeners:

- envd (HTTP/1.1, Quart on Hypercorn) on 127.0.0.1:49983 in the guest. It binds loopback only:
  the host reaches it through the relay, so nothing else on the sandbox's network (the internet
  side of eth0) can talk to it, whatever the token settings;
- the relay (``wire.RELAY_PORT``, vsock in the guest), splicing host connections to guest ports;
- the control port (``wire.CONTROL_PORT``), where the daemon pings, pushes identity after each
  restore, and asks for metrics and logs.

Run it with ``python -m cube.guest.agent``. It imports only the stdlib, trio, hypercorn, quart,
quart-trio, msgspec and (lazily, in the guest) pyroute2, and nothing from ``cube.vmm``: the guest
has Debian's python3.11 with those packages and no compiled cffi modules.
"""

# The highest envd version whose features the SDK may rely on are all implemented here: 0.6.4
# adds allow_network_mounts in watches, on top of include_entry (0.6.3), file metadata (0.6.2),
# octet-stream/gzip uploads (0.5.7), close_stdin (0.5.2), default user (0.4.0), stdin=False
# (0.3.0) and recursive watch (0.1.4).
ENVD_VERSION = "0.6.4"

"""The code-interpreter server a sandbox runs on guest port 49999 (protocol doc §4).

It speaks E2B's ``/execute`` NDJSON stream and ``/contexts`` API over Jupyter kernels driven
in-process by jupyter_client: stateful Python (ipykernel), bash (bash_kernel) and
JavaScript/TypeScript (Deno's kernel), with rich results and matplotlib charts extracted inside
the Python kernel (``kernel_startup.py``, ``charts.py``).

Why asyncio here when the rest of Cube is trio: jupyter_client's async API (``AsyncKernelManager``,
``AsyncKernelClient``, zmq.asyncio sockets) only runs on asyncio, and this is a separate process
inside the guest that shares no code or event loop with the daemon. So it is Quart on hypercorn's
asyncio worker: the same web stack as the daemon (quart-trio is Quart on trio), with no
trio-asyncio bridge in the middle of every kernel message. It imports nothing from ``cube.vmm``
or any compiled cffi module, so it runs on the guest's plain Python 3.11 with pip packages.
"""

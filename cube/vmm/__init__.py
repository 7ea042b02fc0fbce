"""The in-process VMM: KVM bindings, VM and vCPU objects, boot loader, devices, snapshot/restore."""

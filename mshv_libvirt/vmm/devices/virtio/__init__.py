"""virtio devices on the modern virtio-pci transport (virtio 1.2)."""

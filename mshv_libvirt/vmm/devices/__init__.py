"""Platform devices as pure register models: bytes and callbacks in, no sockets, ttys or fds."""

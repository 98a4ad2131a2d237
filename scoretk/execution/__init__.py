"""How a command runs: devices and processes (torchrun), CPU threads, memory settings."""

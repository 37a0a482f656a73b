"""The exchange side: the port the engine talks to and its implementations."""

"""Guards: pure predicates, the per-symbol stop lock, and the terminal-cleanup hook."""

"""position-lifecycle: every futures position as an explicit, journaled finite state machine."""

"""shoal's Textual terminal UI (browse, pull, launch). Not built yet: see the TUI issue."""

"""shoal's Textual terminal UI: browse models, pull, watch transfers, chat, train.

- ``app``       the App: tabs (Models, Transfers, Peers, Jobs), status bar, bindings
- ``link``      the one client the UI talks to the agent through (starts one if none runs)
- ``messages``  dataclass messages the workers post to the UI
- ``screens/``  one screen per file; ``widgets/`` one widget per file; ``app.tcss`` styles
"""

"""``python -m agent.api``: the control API table as Markdown (the README's copy)."""

from agent.api import markdown

print(markdown())

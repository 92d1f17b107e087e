"""The workspace agent: registers the workspace with the platform, then heartbeats."""

from pathlib import Path

AGENT_SCRIPT = Path(__file__).with_name("workspace_agent.py")
AGENT_PAGE = Path(__file__).with_name("index.html")
# The interpreter's flags for the agent: it needs the standard library alone, so no site (its
# .pth files cost a third of the interpreter's start), and it is isolated from the workspace's
# PYTHON* variables and user site-packages, which are the workspace's to write.
AGENT_PYTHON_FLAGS = ("-I", "-S")

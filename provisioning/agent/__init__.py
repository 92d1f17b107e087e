"""The workspace agent: registers the workspace with the platform, then heartbeats."""

from pathlib import Path

AGENT_SCRIPT = Path(__file__).with_name("workspace_agent.py")
AGENT_PAGE = Path(__file__).with_name("index.html")

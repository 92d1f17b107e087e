"""The dashboard: server-rendered pages for a logged-in user (Django's session login)."""

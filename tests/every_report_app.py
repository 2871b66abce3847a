"""Jarvis's app with every blocked-hub report printed: the rate limit (jarvis.diagnostics.REPORT_EVERY_SECONDS,
one report every 10 s) off, for a test that must see each block, not the first of them."""

import jarvis.diagnostics

jarvis.diagnostics.REPORT_EVERY_SECONDS = 0.0

from app import app  # noqa: E402,F401 (after the limit is set: gunicorn loads `app` from here)

"""gunicorn's settings file in a checkout: `gunicorn app:app` (or `-c gunicorn.conf.py`) run from here uses
Jarvis's settings and hooks, which live in the package (jarvis/server_config.py) so that an installed Jarvis
(`jarvis serve`) has them too."""

from jarvis.server_config import *  # noqa: F403 (gunicorn reads this module's names)

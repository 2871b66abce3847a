"""The WSGI app gunicorn serves (`jarvis serve` names it `jarvis.wsgi:app`).

Imported only in a worker, after the gevent worker has monkey-patched: never from gunicorn's master.
"""

from jarvis import create_app

app = create_app()

"""Run from a checkout: `python app.py` is `jarvis serve` (its options, and gunicorn's, pass through), and
`gunicorn app:app` serves the same app with the checkout's gunicorn.conf.py.

`python app.py` must not import the app itself: gunicorn's gevent worker monkey-patches first and imports
the app afterwards.
"""

import sys

if __name__ == "__main__":
    from jarvis.cli import serve

    sys.exit(serve(sys.argv[1:], prog="python app.py"))
else:
    from jarvis.wsgi import app  # noqa: F401 (gunicorn's app:app)

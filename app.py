"""The WSGI app for gunicorn (`gunicorn app:app`); `python app.py` runs gunicorn with gunicorn.conf.py.

`python app.py` must not import the app itself: gunicorn's gevent worker
monkey-patches first and imports `app` afterwards.
"""

import sys

if __name__ == "__main__":
    import os

    from gunicorn.app.wsgiapp import run

    here = os.path.dirname(os.path.abspath(__file__))
    os.chdir(here)
    sys.argv = [sys.argv[0], "--config", os.path.join(here, "gunicorn.conf.py"), *sys.argv[1:], "app:app"]
    sys.exit(run())
else:
    from jarvis import create_app

    app = create_app()

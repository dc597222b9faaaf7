"""What stock gunicorn does, per version: the expectations the controls are held to."""
import gunicorn

GUNICORN = tuple(gunicorn.version_info)

#: gunicorn <= 19.6.0 workers unlink the socket when they exit (benoitc/gunicorn#1298):
#: the stock worker, our control, must lose the socket file there.
STOCK_WORKERS_UNLINK = GUNICORN < (19, 7)

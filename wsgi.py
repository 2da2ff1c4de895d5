"""WSGI entry point: ``gunicorn wsgi:application`` (or ``wsgi:app``), Passenger."""
import os
import signal
import sys
import tempfile

from app import create_app
from settings import ConfigError


def first_to_fail() -> bool:
    """True for the first gunicorn worker of this master to report a bad
    configuration. Only it exits with APP_LOAD_ERROR: when two workers exit
    with it at once, gunicorn's master stops on the first and raises again,
    with a traceback, while reaping the second."""
    marker = os.path.join(tempfile.gettempdir(), f"tempmail-config-error.{os.getppid()}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False


try:
    application = app = create_app()
except ConfigError as exc:
    # A bad config.json is a message for the operator, not a traceback. Exit
    # status 4 is gunicorn's APP_LOAD_ERROR: its master stops ("App failed to
    # load.") instead of forking new workers that would fail the same way.
    # The other workers wait to be stopped by it (SIGTERM), silently.
    if "gunicorn" not in sys.modules or first_to_fail():  # Passenger: every process reports
        print(f"TempMail cannot start: {exc.format_message()}", file=sys.stderr)
        sys.exit(4)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pause()

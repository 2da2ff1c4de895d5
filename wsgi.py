"""WSGI entry point: ``gunicorn wsgi:application`` (or ``wsgi:app``), Passenger."""
import sys

from app import create_app
from settings import ConfigError

try:
    application = app = create_app()
except ConfigError as exc:
    # A bad config.json is a message for the operator, not a traceback. Exit
    # status 4 is gunicorn's APP_LOAD_ERROR: its master stops ("App failed to
    # load.") instead of forking new workers that would fail the same way.
    print(f"TempMail cannot start: {exc.format_message()}", file=sys.stderr)
    sys.exit(4)

"""How a front answers its errors: each API module (and the web page) gives
its own ``http_error(exc)`` and ``server_error()`` shapes; this wires them to
its blueprint, and logs and rolls back an unexpected exception the same way
everywhere, never showing a traceback."""
from __future__ import annotations

from typing import Callable

from flask import Blueprint, current_app, request
from werkzeug.exceptions import HTTPException

from database import db


def failed(server_error: Callable, exc: Exception):
    """An unexpected exception: undo the request's transaction, log it with
    its traceback (for the operator), answer ``server_error()`` (for the client)."""
    db.session.rollback()
    # Flask's own wording and logger, so deployments that route or mask the
    # app's error lines (deploy/gunicorn.conf.py, logmask.py) see these too.
    current_app.logger.error("Exception on %s [%s]", request.path, request.method, exc_info=exc)
    return server_error()


def own_errors(bp: Blueprint, http_error: Callable, server_error: Callable) -> None:
    """Make ``bp`` answer its HTTP errors and unexpected exceptions in its own shape."""
    bp.register_error_handler(HTTPException, http_error)
    bp.register_error_handler(Exception, lambda exc: failed(server_error, exc))

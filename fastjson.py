"""Flask's JSON answers encoded with orjson (several times faster than the
stdlib encoder: a 50-message listing spent more time in ``json.dumps`` than
in its database query).

The output means the same JSON as Flask's default provider: keys in the
order the views build them (``sort_keys`` is honoured), dates, decimals,
dataclasses and ``__html__`` objects through Flask's own ``default``. Only
the spelling differs: non-ASCII characters are sent as UTF-8 instead of
``\\u00e9``-style escapes. Anything orjson refuses (an integer beyond 64 bits, a
lone surrogate) and any call with encoder options (``indent``, the session
cookie's ``separators``) goes to Flask's stdlib encoder unchanged.
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class FastJSONProvider(DefaultJSONProvider):
    """``DefaultJSONProvider`` with orjson for the plain cases."""

    def _encode(self, obj: Any) -> bytes:
        option = _OPTIONS | (orjson.OPT_SORT_KEYS if self.sort_keys else 0)
        return orjson.dumps(obj, default=self.default, option=option)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if not kwargs:
            try:
                return self._encode(obj).decode()
            except (TypeError, orjson.JSONEncodeError):
                pass  # what orjson cannot write, the stdlib encoder can (or raises as before)
        return super().dumps(obj, **kwargs)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        if self.compact is False or (self.compact is None and self._app.debug):
            return super().response(*args, **kwargs)  # pretty-printed, as Flask does in debug
        try:
            body = self._encode(obj)
        except (TypeError, orjson.JSONEncodeError):
            return super().response(*args, **kwargs)
        return self._app.response_class(body + b"\n", mimetype=self.mimetype)


def init_app(app: Flask) -> None:
    """Make ``jsonify`` and ``app.json`` use orjson, keeping the app's JSON settings."""
    sort_keys = app.json.sort_keys
    app.json = FastJSONProvider(app)
    app.json.sort_keys = sort_keys

"""The User API's webhook routes: ``/api/webhook`` and ``/api/webhook/deliveries``.

They live on the User API's own blueprint (``api_v1.bp``), so they share its
Bearer authentication, quota counting and ``{"status": false, "message"}``
errors; this module only has to be imported before the app is built (app.py
does). The tables, the URL policy and the outbox are in ``webhooks.py``, the
sender in ``webhook_worker.py``.
"""
from __future__ import annotations

import webhooks
from api_v1 import ApiError, base_url, bp, input_value, ok, user
from models import db

NO_WEBHOOK = "No webhook is set."


def own_webhook() -> webhooks.Webhook:
    hook = webhooks.of_user(user().id)
    if hook is None:
        raise ApiError(404, NO_WEBHOOK)
    return hook


@bp.put("/webhook")
def put_webhook():
    """Set (or replace) the webhook; the answer carries its new secret, the one
    time it is ever shown."""
    try:
        url = webhooks.check_url(input_value("url"), webhooks.allow_private())
    except webhooks.UnsafeURL as exc:
        raise ApiError(422, str(exc))
    hook, secret = webhooks.set_webhook(user().id, url, base_url())
    db.session.commit()
    return ok(data=dict(webhooks.webhook_json(hook), secret=secret))


@bp.get("/webhook")
def get_webhook():
    return ok(data=webhooks.webhook_json(own_webhook()))


@bp.delete("/webhook")
def delete_webhook():
    """Remove the webhook; events not yet delivered are dropped with it."""
    if not webhooks.remove_webhook(user().id):
        raise ApiError(404, NO_WEBHOOK)
    db.session.commit()
    return ok(message="Webhook was removed.")


@bp.get("/webhook/deliveries")
def webhook_deliveries():
    """The newest 50 delivery attempts, newest first."""
    hook = own_webhook()
    return ok(data=[webhooks.attempt_json(row) for row in webhooks.recent_attempts(hook.id)])

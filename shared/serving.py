"""How locally served models are named, keyed and prompted: one rule for the finetune service (which loads
adapters into a serving engine) and the router (which asks that engine for them).

- A model is known system-wide as "<provider>/<name>" (e.g. "local/ft-3f2a9c0d1e2b"); the serving engine (vLLM,
  or the fallback server) knows it by ``served_name`` = the part after the provider ("ft-3f2a9c0d1e2b"). The
  adapter is loaded under that name and the router asks for that name, so both always agree.
- The engine needs a serving key: ``SERVING_API_KEY`` when set (give the same value to vLLM's ``--api-key``),
  else one derived from the deployment's ADMIN_TOKEN, so every process of one deployment has it without a new
  secret to distribute.
- ``SYSTEM_MESSAGE`` is what the router sends as the system turn, and so what training rows carry too.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SYSTEM_MESSAGE = "You explain trading signals to retail investors clearly and accurately."


def served_name(model: str) -> str:
    """The name a serving engine knows `model` by: "local/ft-abc" -> "ft-abc"; a bare name stays as it is."""
    provider, sep, name = model.partition("/")
    name = name if sep else provider
    if not name.strip():
        raise ValueError(f"model {model!r} has no name to serve it under")
    return name


def serving_api_key(explicit: str | None = None, admin_token: str | None = None) -> str | None:
    """The key the serving engine requires: `explicit` (or SERVING_API_KEY), else derived from the admin token;
    None when neither is known."""
    explicit = explicit or os.environ.get("SERVING_API_KEY")
    if explicit:
        return explicit
    if admin_token:
        return "sk-" + hmac.new(admin_token.encode(), b"selflearn:serving-key", hashlib.sha256).hexdigest()[:40]
    return None

"""Declare every queue of the system on the configured Redis (run once at start-up by every deployment)."""

from __future__ import annotations

from shared.bus import declare_topology, make_celery
from shared.settings import ServiceSettings


def main() -> None:
    declare_topology(make_celery("topology", ServiceSettings()))


if __name__ == "__main__":
    main()

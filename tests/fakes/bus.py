"""A bus that records what would have been published: for unit tests of handlers and tasks."""

from __future__ import annotations

from typing import Any

from shared.contracts import Command, Event


class FakeBus:
    """Records what would have been published: for unit tests of handlers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.commands: list[Command] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def send(self, command: Command) -> None:
        self.commands.append(command)

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in [*self.events, *self.commands] if isinstance(m, cls)]

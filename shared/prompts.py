"""The prompt template contract: the placeholders a template may and must use, and how it is rendered.

The optimizer owns the registry and validates variants against this; the router renders with it. Both
must agree, so the contract lives here.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from shared.contracts import PromptTemplate

PROMPT_NAME = "explain_signal"
REQUIRED_PLACEHOLDERS = frozenset({"ticker", "signal", "indicators"})
ALLOWED_PLACEHOLDERS = REQUIRED_PLACEHOLDERS
MAX_TEMPLATE_CHARS = 4000

SEED_TEMPLATE = (
    "You are a financial analyst explaining a trading signal to a retail investor.\n"
    "Ticker: {ticker}\n"
    "Signal: {signal}\n"
    "Indicators:\n{indicators}\n\n"
    "Explain in 3-4 sentences why the indicators support a {signal} signal for {ticker}. "
    "Mention the most important indicator first."
)
SEED_PROMPT = PromptTemplate(name=PROMPT_NAME, version="v1.0", template=SEED_TEMPLATE)


class TemplateError(ValueError):
    pass


def placeholders(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(f"template is not a valid format string: {exc}") from exc


def check_template(template: str) -> None:
    """Raise TemplateError unless the template uses every required placeholder and no other."""
    if not template.strip():
        raise TemplateError("template is empty")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template is longer than {MAX_TEMPLATE_CHARS} characters")
    found = placeholders(template)
    missing = REQUIRED_PLACEHOLDERS - found
    if missing:
        raise TemplateError(f"template drops required placeholders: {', '.join(sorted(missing))}")
    unknown = found - ALLOWED_PLACEHOLDERS
    if unknown:
        raise TemplateError(f"template uses unknown placeholders: {', '.join(sorted(unknown))}")
    # `{ticker!x}` or `{ticker:d}` pass the name check but make `render` raise (or `{ticker:>99999999}` build
    # a huge string) on every request that uses the version: placeholders are plain `{name}` only.
    decorated = sorted(
        f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
        for _, name, spec, conv in string.Formatter().parse(template)
        if name is not None and (spec or conv)
    )
    if decorated:
        raise TemplateError(
            f"placeholders must be plain {{name}}, without conversion or format: {', '.join(decorated)}"
        )


def format_indicators(context: Mapping[str, Any]) -> str:
    if not context:
        return "- (none given)"
    return "\n".join(f"- {key}: {value}" for key, value in sorted(context.items()))


def render(template: str, *, ticker: str, signal: str, context: Mapping[str, Any]) -> str:
    return template.format(ticker=ticker, signal=signal, indicators=format_indicators(context))

"""Keep credentials out of every message: the one place secrets are scrubbed.

Every node registers the secret values of its storage options when its store is set up
(:func:`register_options`). From then on :func:`scrub` replaces them in any text, and
:class:`ScrubFilter`, installed on the logging handlers of a run, does so for every log
record, its arguments and its traceback included. Errors raised from a backend are scrubbed
where they are translated (``Store``), so exceptions, Prefect state messages and events
carry no secret either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ScrubFilter", "install_scrubber", "register", "register_options", "scrub"]

MASK = "***"
# Options that locate a store or tune a client; every other string option is secret.
_PUBLIC_OPTIONS = frozenset({
    "endpoint_url", "region_name", "project", "account_name", "anon", "timeout",
    "connection_timeout", "read_timeout", "retries", "use_ssl", "version_aware",
    "default_block_size", "default_fill_cache", "requester_pays", "consistency",
    "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
    "auto_mkdir", "mode", "max_attempts", "connect_timeout", "signature_version",
})
_MIN_LENGTH = 6  # shorter values would mask ordinary words
# Option values that name a mode, not a secret (gcsfs's token="anon", "google_default", ...).
_MODES = frozenset({"anon", "google_default", "cache", "cloud", "browser", "true", "false"})

_lock = threading.Lock()
_secrets: set[str] = set()


def register(values: Iterable[str]) -> None:
    """Remember ``values`` as secrets for the rest of the process."""
    with _lock:
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= _MIN_LENGTH
                        and v.lower() not in _MODES)


def _secret_leaves(options: Mapping[str, Any], public: bool = False) -> Iterable[str]:
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _secret_leaves(value, public and key in _PUBLIC_OPTIONS)
        elif isinstance(value, str) and key not in _PUBLIC_OPTIONS:
            yield value
            if key == "connection_string":  # its parts may appear on their own
                for field in value.split(";"):
                    name, _, part = field.partition("=")
                    if name.lower() in ("accountkey", "sharedaccesssignature"):
                        yield part
        elif hasattr(value, "get_secret_value"):
            yield str(value.get_secret_value())


def register_options(options: Mapping[str, Any]) -> None:
    """Register the secret values of a node's storage options (keys, tokens, passwords)."""
    register(_secret_leaves(options))


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ScrubFilter(logging.Filter):
    """Scrubs a log record's message, arguments and traceback before a handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        cleaned = scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = ScrubFilter()


def install_scrubber() -> None:
    """Put the scrubbing filter on every handler of every logger configured so far.

    A filter on a handler sees every record that reaches it, from any logger. Call it once
    logging is configured (Prefect configures its handlers as it is imported); installing
    it twice is harmless.
    """
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)

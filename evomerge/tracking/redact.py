"""Secrets kept out of the store: the parent run's params and its config.yaml artifact are redacted."""

from __future__ import annotations

import re
from typing import Any

_SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "pwd", "credential", "credentials",
                 "auth", "authorization"}  # fmt: skip
REDACTED = "***"


def _is_secret(key: str) -> bool:
    """A config key that names a secret: one of its words (split at `_-.` and case changes) is token, key,
    secret, password, ... (`hf_token`, `api_key`, `apiKey`, `db.password`; not `max_new_tokens`)."""
    leaf = str(key).rsplit(".", 1)[-1]
    words = re.split(r"[_\-\s]+|(?<=[a-z])(?=[A-Z])", leaf)
    return any(w.lower() in _SECRET_WORDS for w in words if w)


def redact_url(value: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`; a token in the query string likewise."""
    value = re.sub(r"(://[^/:@\s]*):[^@/\s]*@", rf"\1:{REDACTED}@", value)
    return re.sub(
        r"([?&][^=&#]*?(?:token|key|secret|password|passwd|pwd|auth)[^=&#]*=)[^&#]*",
        rf"\1{REDACTED}",
        value,
        flags=re.IGNORECASE,
    )


def redact(data: Any, key: str = "") -> Any:
    """A copy of a config (mapping, list or scalar) safe to log: values under secret-named keys replaced by
    `***`, passwords and tokens in URLs too. Used for the parent run's params and its config.yaml artifact."""
    if isinstance(data, dict):
        return {k: (REDACTED if _is_secret(k) and v is not None else redact(v, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, key) for v in data]
    if isinstance(data, str):
        return redact_url(data)
    return data

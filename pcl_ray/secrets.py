"""Credentials never leave the process: URIs are shown, logged and saved with their passwords masked."""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")
SECRET_KEYS = ("tracking.uri", "ray.address", "ray.storage_path", "ray.storage_endpoint")


def redact(uri: Any) -> str:
    """``uri`` with any password replaced by ``***`` (``postgresql://user:***@host/db``)."""
    if not uri:
        return str(uri)
    return _USERINFO.sub(r"\1:***@", str(uri))


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (``model_dump``) whose URI-valued keys carry no password."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for key in SECRET_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and out[section].get(name):
            out[section][name] = redact(out[section][name])
    return out

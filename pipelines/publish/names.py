"""The never-reused name a registry version is served under, on every server (vLLM, Ollama, the gateway).

Kept apart from exports.py so that the service and the gateway, which never import torch or gguf, can name
a version without loading the exporter.
"""

from __future__ import annotations

import hashlib
import re

# Ollama accepts [A-Za-z0-9_.-] in a model name, compares names case-insensitively, refuses ".." and names
# over 128 bytes (ollama types/model/name.go); vLLM takes any string. 64 characters of scope leave room
# for "devtune-", the version, a hash and an Ollama namespace or tag.
_NAME_UNSAFE = re.compile(r"[^a-z0-9_.-]")
MAX_SCOPE_CHARS = 64


def served_name(scope: str, version: str) -> str:
    """The model name a server knows this version by: `devtune-team-payments-v0003`.

    Unique per (scope, version), so never reused: vLLM serves stale cached state when a name is reloaded
    with new weights. A scope that Ollama's rules would change (upper case, '@', '+', '..', or too long)
    keeps a readable slug plus 8 hex digits of the exact scope's sha256, so `dev:Alice` and `dev:alice`
    stay apart.
    """
    kind, _, who = scope.partition(":")
    plain = f"{kind}-{who}"
    slug = re.sub(r"\.{2,}", ".", _NAME_UNSAFE.sub("-", plain.lower()))
    if slug != plain or len(slug) > MAX_SCOPE_CHARS:
        slug = f"{slug[:MAX_SCOPE_CHARS]}-{hashlib.sha256(scope.encode()).hexdigest()[:8]}"
    return f"devtune-{slug}-{_NAME_UNSAFE.sub('-', version.lower())}"

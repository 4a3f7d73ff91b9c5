"""Credentials inside URLs, hidden wherever Keel shows or stores a location.

A recipe can name a tracking server as `https://user:password@host` and data as a presigned
URL whose query string is a signature. Keel's messages, logs and stored records show such
locations with the password and credential parameters replaced by `***`, the user name kept.
`KeelError` applies this to every message it carries (data/errors.py), so an error that names a
location cannot leak what the location held.
"""

from __future__ import annotations

import re

REDACTED = "***"
URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s:]+(:[^/@\s]*)?)@")
# query parameters that carry credentials in presigned or tokened URLs
URL_SECRET_QUERY = re.compile(r"(?P<key>[?&](X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|sig|signature|"
                              r"token|access_token|api_key|key)=)[^&\s]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """URLs keep their user name and lose their password and credential query parameters."""
    def userinfo(m: re.Match) -> str:
        user = m.group("userinfo").split(":", 1)
        return f"{m.group('scheme')}{user[0]}:{REDACTED}@" if len(user) == 2 else f"{m.group('scheme')}{REDACTED}@"

    return URL_SECRET_QUERY.sub(lambda m: m.group("key") + REDACTED, URL_USERINFO.sub(userinfo, text))


def has_url_credentials(location: str) -> bool:
    """Whether a location carries a user:password@ part or a credential query parameter."""
    return redact_text(location) != location


# a key or option whose value is a credential
SECRET_NAME = re.compile(r"(token|secret|passw(or)?d|api[_-]?key|access[_-]?key|credential|auth)", re.IGNORECASE)


def secret_options(args: list[str]) -> list[str]:
    """The options in a command line whose value is a credential (`--api-key K`, `--hf-token=T`), and
    any argument holding a URL with credentials."""
    found = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.startswith("-") and SECRET_NAME.search(flag) and (eq or i + 1 < len(args)):
            found.append(flag)
        elif has_url_credentials(arg):
            found.append(flag if flag.startswith("-") and eq else "a URL with credentials")
    return found


def redact_args(args: list[str]) -> list[str]:
    """A command line as Keel prints it: the value of every credential option hidden, URLs redacted."""
    out = []
    hide_next = False
    for arg in args:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif flag.startswith("-") and SECRET_NAME.search(flag):
            out.append(f"{flag}={REDACTED}" if eq else arg)
            hide_next = not eq
        else:
            out.append(redact_text(arg))
    return out

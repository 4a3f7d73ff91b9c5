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

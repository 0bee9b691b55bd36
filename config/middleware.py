"""Request checks that must run before anything reads the request (sessions, authentication)."""

import re

from django.http import JsonResponse

# RFC 9110 field values: visible characters, space, tab and obs-text; never other controls. A NUL
# reaches the database from a session cookie or a token and fails there (PostgreSQL text cannot
# hold it); runserver passes such a header through, gunicorn refuses it.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RejectMalformedHeadersMiddleware:
    """400 (JSON) for a header value with a control character or a Content-Length that is not a
    number, before the request goes further."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        problem = malformed_header(request.META)
        if problem:
            return JsonResponse({"detail": problem}, status=400)
        return self.get_response(request)


def malformed_header(meta) -> str:
    """What is wrong with the request's headers, or "" when nothing is."""
    for key, value in meta.items():
        if (key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")) and isinstance(value, str):
            if _CONTROL.search(value):
                return f"the {_header_name(key)} header contains a control character"
    length = meta.get("CONTENT_LENGTH") or "0"
    if not (isinstance(length, str) and length.isascii() and length.isdigit()):
        return "the Content-Length header is not a number"
    return ""


def _header_name(meta_key: str) -> str:
    return meta_key.removeprefix("HTTP_").replace("_", "-").title()

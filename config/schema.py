"""What the OpenAPI schema says about every operation (the views serving it: config.schema_views).

`ApiAutoSchema` documents the error answers every operation can give, derived from how the view
is configured (authentication, permissions, throttling, a request body, path parameters,
pagination), so the schema stays true when a view changes. Answers that depend on the domain
(409, 422) are declared on the view with `extend_schema`; a code a view declares wins.
"""

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny, IsAuthenticated


class ErrorSerializer(serializers.Serializer):
    """The body of every error that is not about particular fields."""

    detail = serializers.CharField(help_text="what is wrong, in words")


# Field errors: {"<field or header name>": ["message", ...], ...}; nested fields nest the same
# way (items -> index -> field). An error about the request as a whole has `detail` instead.
VALIDATION_ERROR = {
    "type": "object",
    "description": "Field name (or header name) -> messages; `detail` for the request as a whole.",
    "additionalProperties": {},
}


def validation_error(description: str) -> OpenApiResponse:
    return OpenApiResponse(response=VALIDATION_ERROR, description=description)


def error(description: str) -> OpenApiResponse:
    return OpenApiResponse(response=ErrorSerializer, description=description)


class ApiAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction == "response":
            for code, answer in self._error_responses().items():
                if str(code) not in responses:
                    responses[str(code)] = self._get_response_for_code(answer, str(code), direction=direction)
        return dict(sorted(responses.items()))

    def _error_responses(self) -> dict[int, OpenApiResponse]:
        view, unsafe = self.view, self.method not in ("GET", "HEAD", "OPTIONS")
        takes_body = unsafe and self.get_request_serializer() is not None
        errors = {
            400: validation_error(
                "The request is malformed: a header with a control character, a query parameter out of its range, "
                "or a body that is not valid JSON, nests too deep, holds an unpaired surrogate or fails validation."
            ),
            406: error("None of the media types in Accept can be produced."),
            503: error("A service the API needs (database, broker) does not answer; try again later."),
        }
        if view.authentication_classes:
            errors[401] = error("No credentials, or invalid ones (an unknown or malformed token).")
        custom_permissions = [p for p in view.permission_classes if p not in (AllowAny, IsAuthenticated)]
        csrf = unsafe and SessionAuthentication in view.authentication_classes
        if custom_permissions or csrf:
            errors[403] = error("Not allowed: the caller lacks the permission, or a session request lacks its CSRF token.")
        if "{" in self.path or (self.method == "GET" and self._get_paginator() is not None):
            errors[404] = error("No such object (or not the caller's), a page past the last one, or a cursor the API did not hand out.")
        if takes_body:
            errors[413] = error("The request body is larger than the API accepts.")
            errors[415] = error("The body is not in a media type the operation reads (JSON).")
        if view.throttle_classes:
            errors[429] = error("Too many requests; the Retry-After header says when to try again.")
        return errors

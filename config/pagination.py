"""Pagination of the API's lists: page numbers (validated: junk is a 400 naming the parameter) for
the short ones, a cursor for those that grow with the history."""

from django.utils.dateparse import parse_datetime
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination, PageNumberPagination

MAX_PAGE = 2**31 - 1


class ValidatedPageNumberPagination(PageNumberPagination):
    """DRF's, except that a `page` that is not a positive integer is a 400 instead of the 404 DRF
    gives it; a page past the end stays a 404 (that page is not there). No "last" alias: the
    schema can then say exactly what `page` accepts."""

    last_page_strings = ()

    def paginate_queryset(self, queryset, request, view=None):
        page = request.query_params.get(self.page_query_param)
        if page is not None and not (page.isascii() and page.isdigit() and 1 <= int(page) <= MAX_PAGE):
            raise serializers.ValidationError({self.page_query_param: [f"a whole number from 1 to {MAX_PAGE} is required"]})
        return super().paginate_queryset(queryset, request, view)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}
        return parameters


class NewestFirstCursorPagination(CursorPagination):
    """Newest first, a page at a time, for lists that grow without bound (a customer's orders, the
    saga log): `next` and `previous` are links carrying an opaque `cursor` (where the page starts,
    by created_at then id). Each page is read from an index that leads with (created_at DESC,
    id DESC), so page 1,000 costs what page 1 does; there is no total count, which would read
    every row. A cursor the API did not hand out is a 404 (the page it names is not there)."""

    ordering = ("-created_at", "-id")
    # Each item carries its whole story (an order: its lines, its saga's timeline, its events;
    # about 3 KB of JSON): reading and rendering 50 took about 40 ms of CPU, 20 take under 20.
    page_size = 20

    def decode_cursor(self, request):
        # DRF checks the cursor's offset and direction but not its position, which would reach
        # the query as a created_at that is no date (a 500): it must parse as one.
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None and not _is_datetime(cursor.position):
            raise NotFound(self.invalid_cursor_message)
        return cursor


def _is_datetime(text: str) -> bool:
    try:
        return parse_datetime(text) is not None
    except ValueError:  # well formed but out of range, e.g. month 13
        return False

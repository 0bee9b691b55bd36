"""Page-number pagination whose `?page=` is validated: junk is a 400 naming the parameter."""

from rest_framework import serializers
from rest_framework.pagination import PageNumberPagination

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

"""Admin lists that cost the same with a million rows as with a hundred: the page, its count, its
filters and its search are each read through an index, never by scanning the history.

Django's defaults each read a whole table per page: the paginator's `COUNT(*)` (twice, with the
"N total" next to the search box), `date_hierarchy`'s distinct days, a filter on a field without
choices (its `SELECT DISTINCT`), and the search (`UPPER(col::text) LIKE '%term%'` on every search
field). The pieces here replace them; the admins of the saga log and of the domain apps use them:

- `EstimatedCountPaginator`: a list the planner expects to be long shows its estimate ("about
  1,000,000 sagas") without reading a row; a short one is counted, reading at most
  `EXACT_COUNT_UP_TO` + 1 rows.
- `choices_filter`: a list filter whose choices come from code (registered definitions, payment
  methods), from an index (`distinct_values`) or from the newest rows (`recent_values`), never
  from the whole table.
- `IndexedSearchMixin` with `uuid_q`/`number_q`: a search term that is an id, or the start of a
  UUID, is a primary key (or unique key) lookup; other terms are exact matches on indexed columns.
  Search by part of a free text is not offered on these tables: it cannot use an index.
- `SortableByChangeList`: columns sort only where `sortable_by` says an index serves them, also
  when the URL asks for another.

What still reads more than a page: a filter value that matches almost nothing on a table whose
indexes do not lead with that field (the page walks the ordering index to fill itself), a page far
from the first (the admin pages by OFFSET), and a lookup typed into the URL that no filter offers.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import EmptyResultSet
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.utils.functional import cached_property

# A list the planner expects to hold at most this many rows is counted, reading at most one row
# more; a longer one shows the planner's estimate.
EXACT_COUNT_UP_TO = 1000


def list_count(queryset: QuerySet) -> tuple[int, bool]:
    """(how many rows `queryset` has, whether that is an estimate).

    On PostgreSQL the planner's estimate comes first (EXPLAIN: planned, not run, from the
    statistics ANALYZE and autovacuum keep). Past EXACT_COUNT_UP_TO it is the answer, and no row
    is read: a million sagas, or the 1% of events of one type, cost the same. Under it (or while
    the table has no statistics yet) the rows are counted, reading at most EXACT_COUNT_UP_TO + 1
    of them in the list's order (through the index its pages read); should there be more, the
    answer is the estimate, or that many, whichever is more. Other databases (SQLite, the embedded mode) count exactly:
    their tables are small, and they have no cheap estimate."""
    if connections[queryset.db].vendor != "postgresql":
        return queryset.count(), False
    if has_statistics(queryset):
        planned = planned_rows(queryset)
        if planned > EXACT_COUNT_UP_TO:
            return planned, True
    seen = queryset.values("pk")[: EXACT_COUNT_UP_TO + 1].count()
    if seen <= EXACT_COUNT_UP_TO:
        return seen, False
    return max(planned_rows(queryset), seen), True


def has_statistics(queryset: QuerySet) -> bool:
    """Whether PostgreSQL has counted the table's rows (ANALYZE or VACUUM, which autovacuum runs
    as it grows): without that the planner guesses a table's size from its pages, hundreds of rows
    for an empty table."""
    with connections[queryset.db].cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [queryset.model._meta.db_table])
        row = cursor.fetchone()
    return row is not None and row[0] > 0


def planned_rows(queryset: QuerySet) -> int:
    """How many rows PostgreSQL's planner expects `queryset` to return (EXPLAIN, not run)."""
    try:
        sql, params = queryset.order_by().values("pk").query.sql_with_params()
    except EmptyResultSet:  # .none(), or `__in` an empty list: nothing to ask the planner
        return 0
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    return int(plan[0]["Plan"]["Plan Rows"])


class EstimatedCountPaginator(Paginator):
    """Django's paginator with `list_count`'s count: exact for a short list, the planner's
    estimate for a long one (`estimated` then True, and the admin's pagination says "about").
    A page past the real end is just empty."""

    estimated = False

    @cached_property
    def count(self) -> int:
        count, self.estimated = list_count(self.object_list)
        return count


class SortableByChangeList(ChangeList):
    """A changelist that sorts only by the columns `sortable_by` names, also when the URL asks for
    another (`?o=4`): Django's own only stops offering them in the header."""

    def get_ordering_field(self, field_name):
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


def distinct_values(queryset: QuerySet, field: str, *, limit: int = 50) -> list[str]:
    """The distinct values of `field`, smallest first (at most `limit`), found one index probe
    per value (a "loose index scan": the next value is the first one greater than the last),
    never by reading the rows. Needs an index whose first column is `field`."""
    values: list[str] = []
    rows = queryset.order_by(field).values_list(field, flat=True)
    while len(values) < limit:
        following = rows.filter(**{f"{field}__gt": values[-1]}) if values else rows.exclude(**{f"{field}__isnull": True})
        value = following.first()
        if value is None:
            break
        values.append(value)
    return values


# How many of the newest rows `recent_values` reads.
RECENT_ROWS = 5000


def recent_values(queryset: QuerySet, field: str) -> list[str]:
    """The distinct values of `field` among the newest RECENT_ROWS rows (by primary key), sorted:
    what is current, for a field no index leads with. Older values are not offered, but still
    filter when given in the URL."""
    return sorted(set(queryset.order_by("-pk").values_list(field, flat=True)[:RECENT_ROWS]))


def choices_filter(field: str, choices: Callable[[], Iterable[str]], *, title: str | None = None) -> type[admin.SimpleListFilter]:
    """A list filter on `field` (an exact match) whose choices are `choices()`: what the code
    registers, or what `distinct_values` finds in an index. Any value given in the URL filters,
    listed or not."""

    class ChoicesFilter(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request, model_admin):
            return [(value, value) for value in choices()]

        def queryset(self, request, queryset):
            return queryset.filter(**{field: self.value()}) if self.value() is not None else queryset

    ChoicesFilter.title = title or field.replace("_", " ")
    ChoicesFilter.__name__ = ChoicesFilter.__qualname__ = f"{field.title().replace('_', '')}ChoicesFilter"
    return ChoicesFilter


# --- search ---------------------------------------------------------------------------------------

_HEX = re.compile(r"^[0-9a-f]{1,32}$")


def uuid_q(field: str, term: str) -> Q | None:
    """`field` (a UUID column with an index) equal to the UUID `term` is, or, for the first
    characters of one ("3f2a9c", "3f2a9c41-7b"), in the range of the UUIDs that start with them:
    an equality or a range on the index, not a LIKE over every row's text. None when `term` is
    neither."""
    try:
        return Q(**{field: uuid.UUID(term)})
    except ValueError:
        pass
    digits = term.lower().replace("-", "")
    if not _HEX.match(digits):
        return None
    # UUIDs sort as their hex digits do, in PostgreSQL's uuid type and as SQLite's char(32) alike.
    lowest, highest = (uuid.UUID(digits.ljust(32, pad)) for pad in "0f")
    return Q(**{f"{field}__gte": lowest, f"{field}__lte": highest})  # a foreign key has no __range


def number_q(field: str, term: str) -> Q | None:
    """`field` (an integer key) equal to `term` when it is a whole number, else None."""
    if term.isascii() and term.isdigit() and len(term) < 19:
        return Q(**{field: int(term)})
    return None


class IndexedSearchMixin:
    """The admin's search, answered by indexes: `search_q(term)` says which rows match the whole
    term (a Q of equalities and key ranges, or None: nothing matches). `search_fields` still
    names the fields, so the admin shows its search box; `search_help_text` says what to type."""

    def search_q(self, term: str) -> Q | None:
        raise NotImplementedError

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        q = self.search_q(term)
        return (queryset.filter(q) if q is not None else queryset.none()), False


def any_of(*conditions: Q | None) -> Q | None:
    """The OR of the conditions that are not None (None when all are)."""
    present = [c for c in conditions if c is not None]
    if not present:
        return None
    combined = present[0]
    for condition in present[1:]:
        combined |= condition
    return combined

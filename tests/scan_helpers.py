"""How many rows a piece of code makes PostgreSQL read from a table: what "bounded by what is live"
is measured in, free of the machine's speed."""

import json

from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

STATEMENTS = ("SELECT", "UPDATE", "DELETE", "WITH")


def rows_read(fn, table: str) -> int:
    """The rows the statements `fn` sends read from `table`: `fn` runs in a transaction that is
    rolled back, then each of its statements runs again, in order, under EXPLAIN ANALYZE (in a
    transaction rolled back too, so each sees what it saw the first time), and every scan of the
    table counts the rows it returned or filtered out, times its loops."""
    with CaptureQueriesContext(connection) as captured:
        with transaction.atomic():
            fn()
            transaction.set_rollback(True)
    statements = [q["sql"] for q in captured.captured_queries if q["sql"].lstrip().split(None, 1)[0].upper() in STATEMENTS]
    total = 0
    with transaction.atomic():
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                document = cursor.fetchone()[0]
                document = json.loads(document) if isinstance(document, str) else document
                total += _rows(document[0]["Plan"], table)
        transaction.set_rollback(True)
    return total


def _rows(node: dict, table: str) -> int:
    read = 0
    if node.get("Relation Name") == table and node.get("Node Type", "").endswith("Scan"):
        examined = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        read += examined * node.get("Actual Loops", 1)
    return read + sum(_rows(child, table) for child in node.get("Plans", []))


def statistics_taken_now(table: str) -> None:
    """ANALYZE `table` now and keep autovacuum from doing it again during the test (reset by
    statistics_reset): what the planner believes stays what the table held at this moment."""
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        cursor.execute(f"ANALYZE {table}")


def statistics_reset(table: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")

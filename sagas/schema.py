"""Migration operations for tables that grow with the history (the saga log, the outbox).

`AddIndexConcurrently` builds an index with PostgreSQL's CREATE INDEX CONCURRENTLY, so a table of
millions of rows keeps taking writes while its index is built (a plain CREATE INDEX blocks every
step and every event for as long as it takes). Django's own operation of that name passes
`concurrently=True` to every database's schema editor, which SQLite's (the embedded default) does
not take: this one builds a plain index there, where there is nothing to wait for.

A migration using it must say `atomic = False` (CONCURRENTLY cannot run inside a transaction). If
the build fails on PostgreSQL it leaves an INVALID index behind: drop it and migrate again.
"""

from django.contrib.postgres import operations as postgres
from django.db.migrations import AddIndex


class AddIndexConcurrently(postgres.AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)

"""Migration operations for tables that grow with the history (the saga log, the outbox, orders).

`AddIndexConcurrently` builds an index with PostgreSQL's CREATE INDEX CONCURRENTLY, so a table of
millions of rows keeps taking writes while its index is built (a plain CREATE INDEX blocks every
step and every event for as long as it takes). Django's own operation of that name passes
`concurrently=True` to every database's schema editor, which SQLite's (the embedded default) does
not take: this one builds a plain index there, where there is nothing to wait for.

A migration using it must say `atomic = False` (CONCURRENTLY cannot run inside a transaction). If
the build fails on PostgreSQL it leaves an INVALID index behind: drop it and migrate again.
"""

from django.contrib.postgres import operations as postgres
from django.db.migrations import AddIndex, AlterField, RunSQL


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


class DropFieldIndexConcurrently(AlterField):
    """`AlterField` for a field that only loses its own index (`db_index=False`, e.g. a foreign key
    whose column leads another index): on PostgreSQL the index goes with DROP INDEX CONCURRENTLY,
    which does not hold the table's exclusive lock while queries on it finish (a plain DROP INDEX
    queues every read and write behind the longest one running). Elsewhere, as AlterField does.

    A migration using it must say `atomic = False`. The index's name is the one Django gave it."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        model = from_state.apps.get_model(app_label, self.model_name)
        column = model._meta.get_field(self.name).column
        name = schema_editor._create_index_name(model._meta.db_table, [column])
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(name)}")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        field = model._meta.get_field(self.name)
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field], concurrently=True))


class RunPostgresSQL(RunSQL):
    """RunSQL on PostgreSQL only: for what exists only there (the `_like` pattern index Django adds
    to a unique CharField, a CONCURRENTLY variant). On SQLite it does nothing."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)

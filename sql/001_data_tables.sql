-- The batch ids every data row carries (with its source partition and offset): each ingest
-- batch takes one, so any row can be traced back to its batch and rolled back.
-- The data tables themselves are made from the streams catalog by `pipeline migrate`
-- (pipeline/schema_plan.py, docs/streams.md); a database migrated before the catalog existed
-- already holds the built-in streams' tables, which this file then made.

CREATE SEQUENCE ingest_batch_id_seq INCREMENT BY 1000;  -- each reservation is 1000 batch ids

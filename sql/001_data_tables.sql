-- The batch ids every data row carries (with its source partition and offset): each ingest
-- batch takes one, so any row can be traced back to its batch and rolled back.
-- The data tables themselves are made from the streams catalog by `pipeline migrate`
-- (pipeline/schema_plan.py, docs/streams.md "Tables"). A database where this migration also
-- made the built-in streams' tables keeps them: the catalog's plan finds them as it would make
-- them (docs/streams.md, "Evolution").

CREATE SEQUENCE ingest_batch_id_seq INCREMENT BY 1000;  -- each reservation is 1000 batch ids

"""Data pipeline: corpus -> byte-level BPE -> memory-mapped token files -> (x, y) batches.

- ``trainer.data.tokenizer``: ``train_bpe``, ``save_tokenizer``, ``load_tokenizer``, ``eot_id``
- ``trainer.data.prepare``: ``iter_documents``, ``prepare`` -> ``PreparedData`` (cached token files)
- ``trainer.data.stream``: ``TokenFile``, ``SampleStream``, ``eval_batches``

Nothing is re-exported here: ``trainer.data.prepare`` must stay the module (the function of the
same name would shadow it, breaking ``import trainer.data.prepare as ...`` and monkeypatching).
"""

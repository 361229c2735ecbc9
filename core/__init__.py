"""The leaf core: what the engine, the tasks and the reports all share, importing no other package of this project.

* :mod:`core.errors` — :class:`~core.errors.UserError` and the one-line error report;
* :mod:`core.registry` — named registries with "did you mean" errors;
* :mod:`core.stats` — the clustered bootstrap and safe ratios;
* :mod:`core.results` — the results file's format (metric keys, hashes, the printed table);
* :mod:`core.records` — the per-sample records file (append, resume, read);
* :mod:`core.paired` — paired comparison of two runs' records (bootstrap differences, McNemar's test);
* :mod:`core.loggers` — mirrors of the local files (W&B).
* :mod:`core.hostpool` — per-image host work on a shared pool of threads.
"""

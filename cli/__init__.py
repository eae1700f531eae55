"""The ``moejobs`` command line: one entry point (:func:`cli.main.main`) and a module per
command group.

- :mod:`cli.main`: the argument parser and the dispatch (imports a command's module only when
  that command runs, so ``moejobs worker`` never loads the HTTP client or FastAPI, and
  ``moejobs train`` installs its signal handlers before anything heavy);
- :mod:`cli.server`: ``up``, ``demo``, ``serve``, ``worker``, ``migrate``, with
  :mod:`cli.stack` (the processes ``up`` and ``demo`` run on one machine);
- :mod:`cli.runs`: ``submit``, ``runs``, ``status``, ``cancel``, ``download``, ``smoke-test``
  over :mod:`cli.http` (requests and errors, decoded with the API's own models; prints nothing)
  and :mod:`cli.output` (the lines printed);
- :mod:`cli.train`: ``train`` (``run_train.py``), ``validate`` and ``schema``;
- :mod:`cli.data`: ``tokenizer train`` and ``seed-data``.

Layering: the CLI imports ``service`` and ``worker``; neither imports the CLI. torch is imported
only by the commands that train or sample.
"""

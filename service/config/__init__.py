"""Everything about a job's config documents, one module per concern (pure Python: no torch,
no litgpt, no web framework).

A job is described by two documents: the **train config** (``litgpt pretrain``'s keys plus
moejobs' own) and the **model config** (every field of ``litgpt.Config``). Modules, lowest
first (each imports only those above it):

- ``issues``: :class:`~service.config.issues.Issue` (an error or warning that names its
  document, ``train`` or ``model``, and the key inside it), ``ConfigError``, and the
  translation of pydantic's errors into issues;
- ``fields``: the field types both documents share (names, paths, int64 integers, ...);
- ``train`` and ``model``: the two documents' schemas and their JSON Schema;
- ``plan``: the training plan (micro-batches, optimizer steps, tokens, warm-up);
- ``rules``: rules across sections or documents, and warnings;
- ``validate``: ``validate_configs`` and its result ``Validated`` (models, plan, warnings);
- ``parse``: one parser for files and HTTP bodies (YAML without aliases or duplicate keys,
  JSON, plain JSON values only) and ``load_document``;
- ``presets``: the shipped presets and the smoke test's overrides;
- ``merge``: merging the layers (files < preset < smoke test < overrides) and ``resolve``;
- ``paths``: where the paths of a submitted config may point on the server.

Resources (parameters, FLOPs, memory, time) are ``service.estimate``'s; the checks of input
folders shared by the command line and the API are ``service.checks``'.
"""

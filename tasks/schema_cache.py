"""Build each dataclass's JSON schema once per process, not once per task signature that mentions it.

flytekit 1.16's dataclass transformer calls ``mashumaro.jsonschema.build_json_schema`` every time a task
interface names a dataclass, and again for every nested dataclass field while it walks the type
(``DataclassTransformer.get_literal_type``). ``FineTuneConfig`` is a tree of about twenty dataclasses and
is the input of most of our tasks, so importing ``workflows.fine_tune`` built some 180 schemas, about 6 s
of one core measured on this project's 2-core machine (about 1.5 s with this cache). Every process that
imports the tasks pays that: ``pyflyte run``/``register``, every task pod as it starts, and every torchrun
worker of the Elastic training task.

A schema is a pure function of the type, so the cache returns the same ``JSONSchema`` object for the same
type; flytekit turns it into a fresh dict (``.to_dict()``) each time, so nothing built from it is shared.
Only flytekit's one-argument call is cached; any other call goes straight to mashumaro. The registered
protobufs are those flytekit builds without the cache (tests/test_serialization.py compares them, up to the
order of each node's upstream node ids, which flytekit takes from a set and which changes between any two runs).
"""

from __future__ import annotations

import mashumaro.jsonschema
import mashumaro.jsonschema.builder

_build = mashumaro.jsonschema.builder.build_json_schema  # mashumaro's own function, never replaced
_schemas: dict = {}


def _cached_build_json_schema(instance_type, *args, **kwargs):
    if args or kwargs:
        return _build(instance_type, *args, **kwargs)
    try:
        schema = _schemas.get(instance_type)
    except TypeError:  # an unhashable type form: build it every time, as flytekit does
        return _build(instance_type)
    if schema is None:
        schema = _schemas[instance_type] = _build(instance_type)
    return schema


def install() -> None:
    """flytekit imports ``build_json_schema`` from ``mashumaro.jsonschema`` at each call: replace it there."""
    mashumaro.jsonschema.build_json_schema = _cached_build_json_schema


def uninstall() -> None:
    """Back to mashumaro's function (the reference the serialization test compares against)."""
    mashumaro.jsonschema.build_json_schema = _build
    _schemas.clear()

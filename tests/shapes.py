"""Compare a JSON answer with a documentation example: same keys, same types,
same nesting (values may differ)."""
from __future__ import annotations


def json_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def assert_same_shape(actual, example, path: str = "$") -> None:
    """Fail with the JSON path of the first difference in keys, types or nesting."""
    assert json_type(actual) == json_type(example), \
        f"{path}: {json_type(actual)} ({actual!r}) where the example has {json_type(example)}"
    if isinstance(example, dict):
        assert list(actual.keys()) == list(example.keys()) or set(actual) == set(example), \
            f"{path}: keys {sorted(actual)} != example's {sorted(example)}"
        for key, value in example.items():
            assert_same_shape(actual[key], value, f"{path}.{key}")
    elif isinstance(example, list) and example:
        assert actual, f"{path}: empty list where the example has items"
        for i, item in enumerate(actual):
            assert_same_shape(item, example[0], f"{path}[{i}]")

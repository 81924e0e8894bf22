"""The JSON type checks both HTTP APIs share."""

import pytest

from loraplex.json_fields import first_problem, is_type


@pytest.mark.parametrize("value,t,ok", [
    (1, int, True), (1, float, True), (1.5, float, True), (1.5, int, False),
    (True, int, False), (True, float, False), (True, bool, True), (0, bool, False),
    ("a", str, True), ([], list, True), ({}, dict, True), ({}, list, False)])
def test_is_type_follows_json(value, t, ok):
    assert is_type(value, t) is ok


FIELDS = {"n": int, "stop": (str, list), "temperature": float}


@pytest.mark.parametrize("body,problem", [
    ({"n": 2, "stop": ["x"], "temperature": 0, "seed": None, "store": True}, None),
    ({"n": None}, None),
    ({"bogus": 1}, ("bogus", "unknown field 'p.bogus'")),
    ({"n": "2"}, ("n", 'p.n must be an integer, got "2"')),
    ({"stop": 3}, ("stop", "p.stop must be a string or an array, got 3")),
    ({"stop": ["a", 1]}, ("stop", 'p.stop must be an array of strings, got ["a", 1]')),
])
def test_first_problem_names_the_field(body, problem):
    fields = dict(FIELDS, seed=int)
    got = first_problem(body, fields, {"stop": str}, where="p.", ignored=frozenset({"store"}))
    if problem is None:
        assert got is None
    else:
        assert got[0] == problem[0] and got[1].startswith(problem[1])

"""Guides compiled in a child process (engine.guide_compiler.ProcessCompiler): the same
automaton as in this thread, errors that say the same, a child that dies replaced, and
a closed compiler refusing."""

import json
import os
import signal

import pytest

from loraplex.engine.guide_compiler import ProcessCompiler, compile_guide
from loraplex.errors import InvalidArgument, Unavailable

SCHEMA = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name"]})
KEYS = [("json", SCHEMA), ("regex", r"[a-c]{2,3}x"), ("choice", ("yes", "no"))]
TEXTS = [b'{"name": "Ada", "age": 36}', b'{"name":"Ada"}', b'{"age": 3}', b"abx", b"abcx",
         b"ax", b"yes", b"no", b"maybe", b""]


@pytest.fixture
def compiler():
    compiler = ProcessCompiler()
    yield compiler
    compiler.close()


def test_the_child_builds_the_automaton_this_thread_would(compiler):
    for key in KEYS:
        here, there = compile_guide(key), compiler(key)
        assert [there.matches(t) for t in TEXTS] == [here.matches(t) for t in TEXTS], key
        assert any(there.matches(t) for t in TEXTS)
    assert os.getpid() not in [p.pid for p in compiler._pool._processes.values()]


def test_errors_come_back_as_they_were_raised(compiler):
    with pytest.raises(InvalidArgument, match="lookaround"):
        compiler(("regex", "a(?=b)"))
    with pytest.raises(InvalidArgument, match="not in properties"):
        compiler(("json", '{"type": "object", "required": ["a"]}'))
    assert compiler(("regex", "ok")).matches(b"ok")  # the child is still there


def test_a_child_that_died_is_replaced(compiler):
    compiler(("regex", "a"))
    (child,) = compiler._pool._processes.values()
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert compiler(("regex", "b+")).matches(b"bbb")
    (again,) = compiler._pool._processes.values()
    assert again.pid != child.pid


def test_a_closed_compiler_refuses():
    compiler = ProcessCompiler()
    compiler(("regex", "a"))
    (child,) = compiler._pool._processes.values()
    compiler.close()
    assert not child.is_alive()
    with pytest.raises(Unavailable, match="stopping"):
        compiler(("regex", "a"))

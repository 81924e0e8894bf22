"""Compiling a guide's key (SamplingParams.guide) into its byte automaton, in a child
process.

    compiler = ProcessCompiler()
    dfa = compiler(("json", schema))   # any thread; blocks until compiled
    compiler.close()

Compiling is pure Python (a big schema takes tens of ms). On a thread of the server's
process it holds the GIL against the step loop, which lets go of it at every torch call
and then waits up to the interpreter's switch interval (5 ms) to get it back: on the demo
server, 3 schemas of 200 properties compiled on a worker thread stopped every stream for
360-420 ms. In a child process they cost the server only the unpickling of the result
(17 ms for 200 properties). The child is spawned (no copy of torch's threads or CUDA
state), imports this module and byte_regex only, and starts at the first compile; one
that dies is replaced. Pickle only carries keys and automata between this process and
its own child, never anything read from a file.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from loraplex.engine.byte_regex import ByteDFA, compile_tree, literal, parse
from loraplex.engine.json_schema import schema_to_tree
from loraplex.errors import Unavailable


def guide_tree(key: tuple[str, str | tuple[str, ...]]):
    """The byte_regex tree of a guide's key; raises InvalidArgument for a pattern or
    schema that cannot be used."""
    kind, source = key
    if kind == "choice":
        return ("alt", [literal(choice) for choice in source])
    if kind == "json":
        return schema_to_tree(source)
    return parse(source)


def compile_guide(key: tuple[str, str | tuple[str, ...]]) -> ByteDFA:
    """The automaton of a guide's key, in this thread; raises InvalidArgument when it does
    not compile."""
    return compile_tree(guide_tree(key))


class ProcessCompiler:
    """compile_guide in one child process; compiles queue there in arrival order."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __call__(self, key: tuple[str, str | tuple[str, ...]]) -> ByteDFA:
        pool = self._started()
        try:
            return pool.submit(compile_guide, key).result()
        except BrokenProcessPool:  # the child died (killed, out of memory): a new one
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            return self._started().submit(compile_guide, key).result()

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise Unavailable("the engine is stopping; retry on another replica")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def close(self) -> None:
        """Stop the child (compiles already asked for finish first); later ones raise
        Unavailable."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown()

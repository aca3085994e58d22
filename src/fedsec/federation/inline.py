"""The in-process engine (``engine.name: inline``): the same ServerApp, ClientApp, Message
API messages and strategy as the Ray engine, in one process, without Ray.

Flower 1.41 has one simulation backend (Ray) and its simulation runtime polls for messages
every 0.1 s (twice per round). For two hospitals in CI that is most of the cost, so this
module supplies two small pieces on Flower's public interfaces:

- :class:`InlineBackend` implements Flower's simulation ``Backend`` interface
  (``flwr.server.superlink.fleet.vce.backend.Backend``: build, num_workers, is_worker_idle,
  process_message, terminate) by calling the ClientApp in this process. It does not
  subclass it: importing Flower's vce package loads its SQL link state (sqlalchemy,
  alembic), about 1 s of a few-second CI run; a unit test checks the interface matches. Like a Ray actor, the ClientApp gets its own copy of each message (Ray pickles
  it; so do we), runs with ``torch.set_num_threads(engine.num_cpus)`` (1 by default), and a
  ClientApp that raises becomes an error reply with Flower's own ``ClientAppException`` text.
  The process's torch thread count and global RNG states (torch, NumPy, ``random``) are
  restored after every message, so the server side sees what it would see on Ray.
- :class:`DirectGrid` implements Flower's ``Grid`` interface over any simulation ``Backend``:
  ``send_and_receive`` hands each message to the backend and returns the replies as soon as
  they are back (no link state, no polling). Each virtual node keeps its Flower ``Context``
  across rounds in Flower's own run-info store, with ``partition-id`` / ``num-partitions``
  in its node config. The Ray engine uses it too, over Flower's own ``RayBackend``
  (engine.py): that is what removes Flower's 0.1 s message polling from every Ray round.

Hospitals run one after the other. Results are bit-identical to the Ray engine for the same
scenario and seed (tests/integration/test_inline_engine.py compares the shipped scenarios).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.common.constant import (
    NODE_ID_NUM_BYTES,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    TASK_ID_NUM_BYTES,
    ErrorCode,
)
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsec.errors import FedsecError

if TYPE_CHECKING:  # Flower's vce package imports its SQL link state (sqlalchemy, alembic): ~1 s
    from flwr.server.superlink.fleet.vce.backend import Backend

log = logging.getLogger("flwr")


def generate_rand_int_from_bytes(num_bytes: int) -> int:
    # What flwr.supercore.corestate.utils does for run and node ids; importing that module
    # loads Flower's SQL state (sqlalchemy, alembic): ~1.5 s here.
    return int.from_bytes(os.urandom(num_bytes), "little", signed=False)


def _copy(message: Message) -> Message:
    # Ray hands an actor a pickled copy of the message and the driver an unpickled reply: a
    # ClientApp can never change the server's objects (the global model the strategy keeps).
    return pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


@contextlib.contextmanager
def client_process_state(num_threads: int):
    """What a ClientApp changes in its process stays in the ClientApp: torch's thread count
    (set to the hospital's CPU share, as Ray does for an actor) and the global RNGs it seeds."""
    threads = torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    if threads != num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


class InlineBackend:
    """Flower's simulation ``Backend`` interface, run in this process.

    ``backend_config``: ``{"client_resources": {"num_cpus": c}}`` as for Ray; the ClientApp
    runs with ``torch.set_num_threads(max(1, int(c)))``.
    """

    def __init__(self, backend_config: dict[str, Any] | None = None) -> None:
        resources = (backend_config or {}).get("client_resources", {}) or {}
        self.num_threads = max(1, int(resources.get("num_cpus", 1)))
        self.app_fn: Callable[[], ClientApp] | None = None
        self.clientapp_runtime = 0.0
        self.messages = 0

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("call build() before process_message()")
        t0 = time.perf_counter()
        message = _copy(message)
        try:
            with client_process_state(self.num_threads):
                app = self.app_fn()
                out = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:  # the Ray actor's wording, so errors read the same on both engines
            raise ClientAppException(str(ex)) from ex
        finally:
            self.clientapp_runtime += time.perf_counter() - t0
            self.messages += 1
        return _copy(out), context

    def terminate(self) -> None:
        pass


class DirectGrid(Grid):
    """Flower's ``Grid`` interface over a :class:`Backend`, without link state or polling:
    a message is processed when it is pushed and its reply is ready when pulled. With a
    backend of several workers (Ray's actor pool) messages are processed side by side, as
    Flower's simulation runtime does, one thread per worker.

    ``timeout`` in ``send_and_receive``: replies not back in time are dropped (the strategy
    then reports those hospitals as not having replied). In this process a hospital's
    computation cannot be interrupted: messages not yet started when the time is up get
    no reply.
    """

    def __init__(self, backend: "Backend | InlineBackend", num_nodes: int, run: Run | None = None) -> None:
        self.backend = backend
        self._run = run or _new_run()
        self.node_ids: list[int] = []
        self.stores: dict[int, DeprecatedRunInfoStore] = {}
        seen: set[int] = set()
        while len(self.node_ids) < num_nodes:  # random ids, as Flower's link state gives
            nid = generate_rand_int_from_bytes(NODE_ID_NUM_BYTES)
            if nid in seen or nid == SUPERLINK_NODE_ID:
                continue
            seen.add(nid)
            self.node_ids.append(nid)
        for partition, nid in enumerate(self.node_ids):
            store = DeprecatedRunInfoStore(node_id=nid, node_config={PARTITION_ID_KEY: partition,
                                                                      NUM_PARTITIONS_KEY: num_nodes})
            store.register_context(run_id=self._run.run_id, run=self._run)
            self.stores[nid] = store
        self._replies: dict[str, Message] = {}

    # ---- Grid interface ------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message], deadline: float | None = None) -> Iterable[str]:
        ids, todo = [], []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            md = msg.metadata
            if md.reply_to_message_id != "" or md.ttl <= 0 or md.delivered_at != "":
                raise ValueError(f"Invalid message: {msg}")
            if md.dst_node_id not in self.stores:
                log.error("Invalid destination node ID for Message: %s", md.dst_node_id)
                continue  # Flower's link state drops it too: no reply
            ids.append(md.message_id)
            todo.append(msg)
        workers = min(max(1, int(self.backend.num_workers)), len(todo))
        if workers <= 1:
            for msg in todo:
                if deadline is not None and time.time() > deadline:
                    break  # timed out before it started
                self._replies[msg.metadata.message_id] = self._process(msg)
            return ids
        # Daemon threads, one per backend worker: a Ctrl-C or a timeout leaves the ServerApp at
        # once; a thread still waiting on a Ray actor must not keep the process alive.
        lock = threading.Lock()
        queue = iter(todo)

        def work() -> None:
            while True:
                with lock:
                    msg = next(queue, None)
                if msg is None or (deadline is not None and time.time() > deadline):
                    return
                reply = self._process(msg)
                with lock:
                    self._replies[msg.metadata.message_id] = reply

        threads = [threading.Thread(target=work, name=f"fedsec-grid-{i}", daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.time()))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        # a reply that comes back after its timeout is dropped here, as Flower drops expired ones
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        deadline = None if timeout is None else time.time() + timeout
        ids = self.push_messages(messages, deadline)
        return self.pull_messages(ids)

    # ---- one message, as Flower's simulation worker handles it ------------------------------
    def _process(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        store = self.stores[node_id]
        try:
            context = store.retrieve_context(run_id=message.metadata.run_id)
            out, context = self.backend.process_message(message, context)
            store.update_context(message.metadata.run_id, context=context)
        except Exception as ex:  # noqa: BLE001  reported as an error reply, like Flower's worker
            log.debug("%s", traceback.format_exc())
            if isinstance(ex, ClientAppException):
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            elif isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            else:
                code = ErrorCode.UNKNOWN
            out = Message(Error(code=code, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)
        out.metadata.__dict__["_message_id"] = str(uuid4())
        return out


def _new_run() -> Run:
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    return run


@contextlib.contextmanager
def _task_identity(run: Run):
    # Flower's Message constructor stamps run id and source node from this process-wide
    # identity; run_simulation sets it the same way for the ServerApp's process.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_inline(scenario, serve_fn, num_hospitals: int, verbose: bool = False, client_app: ClientApp | None = None):
    """Run ``serve_fn(grid)`` as the ServerApp with one in-process virtual node per hospital.

    Returns what ``serve_fn`` returned; exceptions raised in the ServerApp propagate.
    """
    from fedsec.federation.engine import quiet

    quiet(verbose)
    if scenario.engine.num_gpus > 0:
        from fedsec.federation.engine import check_resources

        check_resources(scenario)
    backend = InlineBackend({"client_resources": {"num_cpus": float(scenario.engine.num_cpus),
                                                  "num_gpus": float(scenario.engine.num_gpus)}})
    return run_on_backend(backend, serve_fn, num_hospitals, client_app)


def run_on_backend(backend: "Backend | InlineBackend", serve_fn, num_hospitals: int, client_app: ClientApp | None = None):
    """``serve_fn(grid)`` as the ServerApp on a :class:`DirectGrid` over ``backend`` (built
    here with fedsec's ClientApp, terminated afterwards), one virtual node per hospital."""
    if client_app is None:
        from fedsec.federation.client_app import app as client_app
    run = _new_run()
    holder: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        holder["result"] = serve_fn(grid)

    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        backend.build(lambda: client_app)
        grid = DirectGrid(backend, num_hospitals, run)
        with _task_identity(run):
            server_app(grid=grid, context=context)
    except BaseException:
        # The run is ending (Ctrl-C, or the ServerApp failed: e.g. hospitals that did not
        # reply in time). Hospitals' threads still waiting on Ray actors fail once the backend
        # terminates; Flower's backend logs each as an ERROR, after fedsec has already said why
        # the run ended. Say nothing more unless --verbose asked for Flower's logs
        # (engine.quiet() sets the level again for the next run).
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.CRITICAL)
        raise
    finally:
        backend.terminate()
    if "result" not in holder:
        raise FedsecError("the engine ended before the ServerApp finished")
    return holder["result"]

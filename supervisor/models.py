"""The daemon's models: one core per model, routing by name, loading and unloading at runtime.

    client message ──route(header["model"])──► that model's core (its queue, workers, template)
    worker message ──its slot──────────────────► the core that started it
    control load / unload / scale / reload ──► here: a core is made, drained, or told

Each model is a pool of its own, run by an unchanged single-model core (core.py): its own
queue and bounds, workers, template, restart budget and health. So a model that floods,
crashes or is poisoned degrades only itself, and dispatch is fair across models by
construction: a model's requests only ever run on that model's workers. Slots come from one
counter shared by every core, so a worker's identity names its model too.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from typing import Any, Callable

from isopool.protocol import ops
from isopool.protocol.errors import BadRequest, NotAllowed, UnknownModel
from isopool.protocol.schemas import MAX_WORKERS

from . import control as ctl
from .actions import SignalReceived
from .config import MODEL_NAME, PoolConfig
from .core import Core
from .devices import parse_devices
from .phase import Phase

log = logging.getLogger("isopool.supervisor")


class Served:
    """One model of the daemon."""

    def __init__(self, config: PoolConfig, core: Core, initial: bool):
        self.config = config
        self.core = core
        self.initial = initial  # given at start: its failure to load fails `serve`
        self.unloading = False
        self.ready_said = False  # its core said READY=1
        self.stopping_for: str | None = None  # stopped because the model named failed to load at start

    @property
    def name(self) -> str:
        return self.config.model_name


class Models:
    def __init__(self, boards: Callable, now: float):
        self.boards = boards
        self.slots = itertools.count()
        self.by_name: dict[str, Served] = {}
        self.by_slot: dict[int, Served] = {}
        self.started_at = now
        self.ready_said = False  # READY=1 went out

    def add(self, config: PoolConfig, now: float, initial: bool) -> Served:
        devices = parse_devices(config.devices)
        core = Core(config, devices, self.boards, random.Random(), now=now, slot_numbers=self.slots)
        served = self.by_name[config.model_name] = Served(config, core, initial)
        return served

    def __iter__(self):
        return iter(list(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def first(self) -> Served:
        return next(iter(self.by_name.values()))

    def names(self) -> list[str]:
        return list(self.by_name)

    def cores(self) -> list[Core]:
        return [s.core for s in self.by_name.values()]

    def let_go(self, slot: int, served: Served) -> None:
        """The shell no longer watches `slot`'s process: forget the slot, unless its core keeps it."""
        if slot not in served.core.workers:
            self.by_slot.pop(slot, None)

    def route(self, name: Any) -> Served:
        """The model a request names; BadRequest or UnknownModel (listing the names) if none fits."""
        if name is None:
            if len(self.by_name) == 1:
                return self.first
            raise BadRequest(f"this daemon serves {len(self.by_name)} models ({', '.join(self.by_name)}); name "
                             "one: infer(x, model=...), Client(endpoint, model=...), or isopool infer --model NAME",
                             field="model", models=self.names())
        served = self.by_name.get(name)
        if served is None or served.unloading:
            raise UnknownModel(f"no model named {name!r} is served here; the models are: "
                               f"{', '.join(n for n, s in self.by_name.items() if not s.unloading)}",
                               model=name, models=self.names())
        return served

    def all_ready(self, served: Served) -> bool:
        """`served` said READY=1: True the first time every model given at start has."""
        served.ready_said = True
        if self.ready_said or not all(s.ready_said for s in self if s.initial):
            return False
        self.ready_said = True
        return True

    def stopped(self) -> list[Served]:
        """Models whose core has stopped: unloaded ones, and ones that failed to load."""
        return [s for s in self.by_name.values() if s.core.phase is Phase.STOPPED]

    def settle(self, now: float, emit: Callable[[str, dict], Any], stop_template: Callable[[str], None]
               ) -> tuple[str, int] | None:
        """Models whose core stopped on its own: unloaded ones, and ones that failed to load. A
        model given at start that failed stops every other model too, and is returned as
        (message, exit code) for `serve` to fail with."""
        failed = None
        for served in self.stopped():
            core = served.core
            if core.startup_error and served.initial:
                if served.stopping_for is None:  # said once
                    served.stopping_for = served.name
                    failed = (f"model {served.name}: {core.startup_error}" if len(self) > 1 else core.startup_error,
                              core.exit_code)
                    for other in self:
                        if other is not served:
                            other.stopping_for = served.name
                            other.core.handle(SignalReceived("SIGTERM"), now)
            elif not served.initial or served.unloading:
                if core.startup_error:
                    log.error("model %s did not load: %s", served.name, core.startup_error)
                    emit("load_failed", {"model": served.name, "error": core.startup_error})
                else:
                    emit("unloaded", {"model": served.name})
                stop_template(served.name)
                if len(self) > 1:
                    self.remove(served)
        return failed

    def remove(self, served: Served) -> None:
        del self.by_name[served.name]
        for slot in [slot for slot, s in self.by_slot.items() if s is served]:
            del self.by_slot[slot]

    # ------------------------------------------------------------ control

    def control(self, action: str, args: dict, admin: bool, now: float) -> dict:
        """A control op for the daemon: answered here, or by the named model's core."""
        if not admin:
            raise NotAllowed("control ops (scale, reload, load, unload, stop) need an admin key; this client's key "
                             "is not in --curve-admins")
        name = args.get("model")
        if action == ops.LOAD:
            return self.load(args, now)
        if action == ops.UNLOAD:
            return self.unload(args.get("name", name), now)
        if action in (ops.SHUTDOWN, ops.DRAIN):
            for core in self.cores():
                core.now = now
                ctl.begin_drain(core, "stop requested by a client", now)
            return {"stopping": True, "drain_timeout_s": self.first.config.drain_timeout}
        if action == ops.RELOAD:
            targets = [self.route(name)] if name is not None else list(self)
            total = 0
            for served in targets:
                served.core.now = now
                total += ctl.reload(served.core, now)
            return {"reloading": total, "models": [s.name for s in targets]}
        if action == ops.SCALE:
            served = self.route(name)
            served.core.now = now
            return {**ctl.control(served.core, action, args), "model": served.name}
        raise BadRequest(f"unknown control action {action!r}; use one of {', '.join(sorted(ops.ACTIONS))}")

    def load(self, args: dict, now: float) -> dict:
        """Start a model while serving; under a name already served, a rolling replace."""
        name, spec, workers = args.get("name"), args.get("model"), args.get("workers")
        if type(name) is not str or not MODEL_NAME.fullmatch(name):
            raise BadRequest(f"load needs a name of 1 to 64 letters, digits, '_', '-' or '.', got {name!r}",
                             field="name")
        if type(spec) is not str or ":" not in spec:
            raise BadRequest(f"load needs model = MODULE:ATTR, got {spec!r}", field="model")
        if workers is not None and (type(workers) is not int or not 1 <= workers <= MAX_WORKERS):
            raise BadRequest(f"load needs a worker count from 1 to {MAX_WORKERS}, got {workers!r}", field="workers")
        served = self.by_name.get(name)
        if served is not None and not served.unloading:  # a new implementation: roll the workers over to it
            config = dataclasses.replace(served.config, model=spec, **({"workers": workers} if workers else {}))
            served.config = served.core.config = config
            if workers:
                served.core.target = workers
            served.core.now = now
            rolled = ctl.reload(served.core, now)
            return {"model": name, "replacing": rolled, "implementation": spec}
        if served is not None:
            raise BadRequest(f"model {name!r} is still unloading; load it again once it has stopped", field="name")
        base = self.first.config
        config = dataclasses.replace(base, model=spec, model_name=name, workers=workers or base.workers, user_config={})
        try:
            self.add(config, now, initial=False)
        except ValueError as exc:
            raise BadRequest(f"cannot load {name}: {exc}") from None
        return {"model": name, "loading": True, "workers": config.workers, "implementation": spec}

    def unload(self, name: Any, now: float) -> dict:
        served = self.route(name)
        if len([s for s in self if not s.unloading]) == 1:
            raise BadRequest(f"{served.name} is the only model served; stop the daemon instead (isopool stop)",
                             field="name")
        served.unloading = True
        served.core.now = now
        ctl.begin_drain(served.core, "unloaded by a client", now)
        return {"model": served.name, "unloading": True, "queued": served.core.ledger.queued,
                "in_flight": served.core.ledger.busy}

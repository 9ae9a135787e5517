"""Op names and the protocol version: the only place they are spelled."""

VERSION = 1

# client -> supervisor
INFER = "infer"
CANCEL = "cancel"
STATUS = "status"
CONTROL = "control"
HELLO = "hello"  # a client asks for the server's limits as it connects

# supervisor -> client, and worker -> supervisor
RESULT = "result"
CHUNK = "chunk"
ERROR = "error"

# supervisor <-> worker
READY = "ready"
HEARTBEAT = "heartbeat"
RUN = "run"
STOP = "stop"
LOAD_FAILED = "load_failed"  # worker -> supervisor: the model would not build (an error payload)
INTEGRITY_FAILED = "integrity_failed"  # worker -> supervisor: the weights changed since load

CLIENT_OPS = frozenset({INFER, CANCEL, STATUS, CONTROL, HELLO})
REPLY_OPS = frozenset({RESULT, CHUNK, ERROR})
WORKER_OPS = frozenset({READY, HEARTBEAT, RESULT, CHUNK, ERROR, LOAD_FAILED, INTEGRITY_FAILED})
ALL_OPS = CLIENT_OPS | REPLY_OPS | WORKER_OPS | {RUN, STOP}

# control actions carried by CONTROL
SCALE = "scale"
RELOAD = "reload"
DRAIN = "drain"
SHUTDOWN = "stop"
LOAD = "load"  # start a model while serving: args name, model (MODULE:ATTR), workers
UNLOAD = "unload"  # drain a model and stop its workers: args name
ACTIONS = frozenset({SCALE, RELOAD, DRAIN, SHUTDOWN, LOAD, UNLOAD})

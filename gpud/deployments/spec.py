"""A deployment spec: a TOML document decoded strictly into a frozen msgspec Struct.

Specs are applied on one host and gossiped to all, and they make hosts run commands, so every
field is bounded and checked here, once: a spec that loads is one every node can act on. A bad
spec raises `SpecError` whose message leads with the field's path ("replicas: expected `int`
>= 0, got -1"); nothing else happens on error (this module has no state).

    name = "llama-70b"
    engine = "vllm"              # or "command"
    model = "meta-llama/Llama-3.1-70B-Instruct"
    replicas = 2                 # R
    nodes_per_replica = 2        # N hosts per replica (one Ray cluster per replica when N > 1)
    gpus_per_node = 8            # G
    args = ["--max-model-len", "8192"]
    env = { HF_HOME = "/var/cache/hf" }
    health_path = "/health"
    selector = { zone = "a" }    # node labels, all must be equal
    version = "2024-06-01"       # the operator's own revision label
    startup_timeout_s = 3600     # default per engine (STARTUP_TIMEOUT_S)
    ready_check = "completion"   # also a one-token completion, not only health_path

For `engine = "command"`, `command` is an argv template (see `PLACEHOLDERS`).
"""

from __future__ import annotations

import string
import tomllib
from typing import Annotated, Final, Literal

import msgspec

from gpud.errors import GpudError

# A spec body travels over the peer API and is stored by every node; keep it small.
MAX_SPEC_BYTES: Final = 32 * 1024

# Variables gpud sets on every node of a replica from verified facts (see engines.py); a spec
# that could override them could point NCCL at the wrong interface or a server at GPUs it was
# not leased.
GPUD_ENV: Final = frozenset(
    {
        "VLLM_HOST_IP",
        "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME",
        "VLLM_PORT",
        "CUDA_VISIBLE_DEVICES",
        # With another order, index N would be a different GPU to CUDA than to NVML.
        "CUDA_DEVICE_ORDER",
        "RAY_ADDRESS",
    }
)

# Named placeholders of a `command` argv template, filled by engines.command_argv.
PLACEHOLDERS: Final = frozenset(
    {"port", "host_ip", "interface", "ray_address", "gpu_uuids", "gpu_indices", "model"}
)

# vLLM flags gpud derives from the spec and the leases; the spec must not set them in `args`
# (vLLM's argparse would take the last one and silently undo a lease).
VLLM_GPUD_FLAGS: Final = frozenset(
    {
        "--host",
        "--port",
        "--tensor-parallel-size",
        "-tp",
        "--pipeline-parallel-size",
        "-pp",
        "--distributed-executor-backend",
    }
)

# How long a replica's server may take from its start to its first passed health probe before
# it is restarted: vLLM loads a 70B model for minutes, a command server should listen at once.
STARTUP_TIMEOUT_S: Final = {"vllm": 1800, "command": 60}
# Bounds of a spec's own value, in seconds: a day is longer than any model load.
STARTUP_TIMEOUT_BOUNDS: Final = (1, 86400)

Name = Annotated[
    str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
]
Arg = Annotated[str, msgspec.Meta(max_length=1024, pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=4096, pattern=r"^[^\x00]*$")]
LabelKey = Annotated[
    str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._/-]*)$")
]
LabelValue = Annotated[str, msgspec.Meta(max_length=63, pattern=r"^[A-Za-z0-9._-]*$")]
HealthPath = Annotated[
    str, msgspec.Meta(max_length=256, pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")
]
Model = Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[^\x00-\x1f]*$")]
Revision = (
    Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[^\x00-\x1f]*$")]
    | Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
)


class SpecError(GpudError):
    """The deployment spec is invalid; the message leads with the field's path."""


class DeploymentSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: Name
    engine: Literal["vllm", "command"]
    model: Model = ""
    replicas: Annotated[int, msgspec.Meta(ge=0, le=256)]
    nodes_per_replica: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    gpus_per_node: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    args: Annotated[list[Arg], msgspec.Meta(max_length=128)] = []
    env: Annotated[dict[EnvName, EnvValue], msgspec.Meta(max_length=64)] = {}
    health_path: HealthPath = "/health"
    selector: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=16)] = {}
    version: Revision = ""
    # None: the engine's default (STARTUP_TIMEOUT_S); see `startup_timeout`.
    startup_timeout_s: (
        Annotated[
            int,
            msgspec.Meta(ge=STARTUP_TIMEOUT_BOUNDS[0], le=STARTUP_TIMEOUT_BOUNDS[1]),
        ]
        | None
    ) = None
    # "health": GET health_path answers 200. "completion": that and a one-token completion of
    # `model` (POST /v1/completions) answer within the probe timeout: a server whose workers
    # died can keep its health endpoint green.
    ready_check: Literal["health", "completion"] = "health"
    # `command` engine only: argv template; argv[0] an absolute path, checked against the
    # host's allow list before anything runs.
    command: Annotated[list[Arg], msgspec.Meta(max_length=128)] = []


def startup_timeout(spec: DeploymentSpec) -> int:
    """Seconds the replica's server may take to first pass its health probe."""
    if spec.startup_timeout_s is not None:
        return spec.startup_timeout_s
    return STARTUP_TIMEOUT_S[spec.engine]


def load_spec(text: bytes) -> DeploymentSpec:
    """Decode and validate a spec. Raises SpecError naming the field and the problem."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is {len(text)} bytes; at most {MAX_SPEC_BYTES} are allowed")
    try:
        data = tomllib.loads(text.decode())
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec is not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec is not valid TOML: {exc}") from None
    try:
        spec = msgspec.convert(data, DeploymentSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(_field_message(str(exc), data)) from None
    _check(spec)
    # Canonical form: the same document with keys in another order is the same spec.
    return msgspec.structs.replace(
        spec, env=dict(sorted(spec.env.items())), selector=dict(sorted(spec.selector.items()))
    )


# Fields added after gpud 0.1, left out of the canonical JSON at their defaults: a spec that
# does not use them keeps the bytes (so the digest and the operator's signature) it had under
# 0.1, and a 0.1 node, which refuses unknown fields, can still take it during a rolling upgrade.
_OMITTED_AT_DEFAULT = ("startup_timeout_s", "ready_check")
_DEFAULT_OF = {
    name: field.default
    for field in msgspec.structs.fields(DeploymentSpec)
    if (name := field.name) in _OMITTED_AT_DEFAULT
}


def encode(spec: DeploymentSpec) -> bytes:
    """Canonical JSON of a spec (sorted keys): what gets hashed, signed and sent to peers."""
    data = msgspec.to_builtins(spec)
    for name, default in _DEFAULT_OF.items():
        if data[name] == default:
            del data[name]
    return msgspec.json.encode(data, order="sorted")


def decode(body: bytes) -> DeploymentSpec:
    """A spec as sent by `encode`, held to the same checks as `load_spec`."""
    if len(body) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is {len(body)} bytes; at most {MAX_SPEC_BYTES} are allowed")
    try:
        spec = msgspec.json.decode(body, type=DeploymentSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(_field_message(str(exc), msgspec.json.decode(body))) from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"spec is not valid JSON: {exc}") from None
    _check(spec)
    return spec


def template_fields(arg: str) -> list[str]:
    """Placeholder names in one template argument; ValueError for anything but `{name}`."""
    names = []
    for _, field, fmt, conversion in string.Formatter().parse(arg):
        if field is None:
            continue
        # `{0}`, `{}`, `{a.b}`, `{a[0]}`, `{a!r}` and `{a:>9}` would reach into Python objects
        # or reformat values; a template names a placeholder and nothing else.
        if not field.isidentifier() or fmt or conversion:
            raise ValueError(f"{{{field}}} is not a plain placeholder like {{port}}")
        names.append(field)
    return names


def _check(spec: DeploymentSpec) -> None:
    """Checks that span fields; raises SpecError."""
    for key in spec.env:
        if key in GPUD_ENV:
            raise SpecError(
                f"env.{key}: gpud sets {key} itself from the node's verified address, "
                f"interface, leased ports and GPUs; remove it from the spec"
            )
    if spec.ready_check == "completion" and not spec.model:
        raise SpecError('ready_check: "completion" asks for a completion of `model`; set model')
    if spec.engine == "vllm":
        if not spec.model:
            raise SpecError('model: required for engine "vllm"')
        if spec.gpus_per_node < 1:
            raise SpecError(
                'gpus_per_node: engine "vllm" needs at least 1 (it is the tensor-parallel size)'
            )
        if spec.command:
            raise SpecError('command: only for engine "command"; vllm\'s argv is built by gpud')
        for i, arg in enumerate(spec.args):
            flag = arg.split("=", 1)[0]
            if flag in VLLM_GPUD_FLAGS:
                raise SpecError(
                    f"args[{i}]: {flag} is set by gpud from the spec and the leases; remove it"
                )
        return
    if spec.args:
        raise SpecError('args: only for engine "vllm"; put arguments in the command template')
    if not spec.command:
        raise SpecError('command: required for engine "command" (an argv template)')
    argv0 = spec.command[0]
    if not argv0.startswith("/") or "{" in argv0:
        raise SpecError(
            f"command[0]: {argv0!r} must be an absolute path without placeholders "
            f"(it is checked against each host's allow list)"
        )
    for i, arg in enumerate(spec.command):
        try:
            names = template_fields(arg)
        except ValueError as exc:
            raise SpecError(f"command[{i}]: {exc}") from None
        for field in names:
            if field not in PLACEHOLDERS:
                known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
                raise SpecError(f"command[{i}]: unknown placeholder {{{field}}}; known: {known}")
            if field == "ray_address" and spec.nodes_per_replica < 2:
                raise SpecError(
                    f"command[{i}]: {{ray_address}} needs nodes_per_replica > 1 "
                    f"(single-node replicas run no Ray cluster)"
                )
            if field == "model" and not spec.model:
                raise SpecError(f"command[{i}]: {{model}} is used but model is empty")


def _field_message(message: str, data: object) -> str:
    """Turn msgspec's "Expected `int` >= 0 - at `$.replicas`" into "replicas: expected ..."."""
    text, sep, where = message.partition(" - at ")
    if not sep:
        # "Object contains unknown field `x`" comes without a path for the top level.
        return f"spec: {text[0].lower()}{text[1:]}"
    where = where.strip("`")
    if where.startswith("key` in `"):
        path = where.removeprefix("key` in `").removeprefix("$").lstrip(".")
        return f"{path}: key {text[0].lower()}{text[1:]}"
    path = where.removeprefix("$").lstrip(".")
    got = _lookup(data, path)
    detail = f"{text[0].lower()}{text[1:]}"
    if got is not _MISSING and ", got " not in detail:
        # A list or table is shown by its length, not dumped.
        shown = f"{len(got)} items" if isinstance(got, list | dict) else repr(got)
        detail += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return f"{path}: {detail}"


_MISSING = object()


def _lookup(data: object, path: str) -> object:
    """The value at msgspec's path ("args[3]", "env.FOO"), or _MISSING."""
    node = data
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            try:
                node = node[int(part.strip("[]"))]  # type: ignore[index]
            except (ValueError, IndexError, KeyError, TypeError):
                return _MISSING
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node

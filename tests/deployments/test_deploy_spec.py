"""Deployment spec: strict decoding, bounded sizes, and errors that lead with the field's path."""

from __future__ import annotations

import pytest

from gpud.deployments.spec import (
    GPUD_ENV,
    MAX_SPEC_BYTES,
    DeploymentSpec,
    SpecError,
    decode,
    encode,
    load_spec,
    startup_timeout,
)

VLLM = b"""
name = "llama-70b"
engine = "vllm"
model = "meta-llama/Llama-3.1-70B-Instruct"
replicas = 2
nodes_per_replica = 2
gpus_per_node = 8
args = ["--max-model-len", "8192"]
env = { HF_HOME = "/var/cache/hf", A_FIRST = "1" }
health_path = "/health"
selector = { zone = "a", "gpu.type" = "h100" }
version = "2024-06-01"
"""

COMMAND = b"""
name = "sglang"
engine = "command"
model = "Qwen/Qwen2.5-0.5B"
replicas = 1
nodes_per_replica = 2
gpus_per_node = 1
command = ["/opt/sglang/bin/server", "--port={port}", "--host", "{host_ip}",
           "--ray", "{ray_address}", "--model", "{model}", "--devices", "{gpu_uuids}",
           "--if", "{interface}", "--literal={{braces}}"]
version = 7
"""


def error(text: bytes) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    return str(info.value)


def vllm_with(**fields: str) -> bytes:
    """The minimal vllm spec with some lines replaced or added (values are TOML text)."""
    base = {"name": '"m"', "engine": '"vllm"', "model": '"org/m"', "replicas": "1"}
    base["gpus_per_node"] = "1"
    base.update(fields)
    return "\n".join(f"{k} = {v}" for k, v in base.items()).encode()


def test_full_vllm_spec_decodes() -> None:
    spec = load_spec(VLLM)
    assert spec.name == "llama-70b"
    assert (spec.replicas, spec.nodes_per_replica, spec.gpus_per_node) == (2, 2, 8)
    assert spec.args == ["--max-model-len", "8192"]
    assert spec.selector == {"gpu.type": "h100", "zone": "a"}
    assert spec.version == "2024-06-01"
    # Canonical: tables are sorted, so key order in the file does not change the spec.
    assert list(spec.env) == ["A_FIRST", "HF_HOME"]


def test_command_spec_decodes_with_every_placeholder() -> None:
    spec = load_spec(COMMAND)
    assert spec.engine == "command"
    assert spec.command[0] == "/opt/sglang/bin/server"
    assert spec.version == 7


def test_defaults() -> None:
    spec = load_spec(vllm_with())
    assert spec.nodes_per_replica == 1
    assert spec.health_path == "/health"
    assert spec.env == {} and spec.selector == {} and spec.args == []
    assert spec.version == ""


def test_a_completion_check_needs_a_model() -> None:
    assert load_spec(vllm_with(ready_check='"completion"')).ready_check == "completion"
    no_model = COMMAND.replace(b'model = "Qwen/Qwen2.5-0.5B"\n', b"").replace(
        b'"--model", "{model}", ', b""
    )
    assert load_spec(no_model).ready_check == "health"
    assert error(no_model + b'ready_check = "completion"\n').startswith("ready_check: ")


def test_startup_timeout_is_long_for_vllm_short_for_a_command_unless_set() -> None:
    assert startup_timeout(load_spec(vllm_with())) == 1800
    assert startup_timeout(load_spec(COMMAND)) == 60
    own = load_spec(vllm_with(startup_timeout_s="7200"))
    assert own.startup_timeout_s == 7200 and startup_timeout(own) == 7200
    assert decode(encode(own)) == own


def test_key_order_does_not_change_the_canonical_encoding() -> None:
    a = load_spec(vllm_with(env='{ B = "2", A = "1" }', selector='{ y = "1", x = "2" }'))
    b = load_spec(vllm_with(selector='{ x = "2", y = "1" }', env='{ A = "1", B = "2" }'))
    assert encode(a) == encode(b)


def test_encode_decode_round_trip() -> None:
    for text in (VLLM, COMMAND):
        spec = load_spec(text)
        assert decode(encode(spec)) == spec


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"replicas": "-1"}, "replicas: expected `int` >= 0, got -1"),
        ({"replicas": "100000"}, "replicas: expected `int` <= 256, got 100000"),
        ({"replicas": '"2"'}, "replicas: expected `int`, got `str`"),
        ({"nodes_per_replica": "0"}, "nodes_per_replica: expected `int` >= 1, got 0"),
        ({"gpus_per_node": "-2"}, "gpus_per_node: expected `int` >= 0, got -2"),
        ({"engine": '"tgi"'}, "engine: invalid enum value 'tgi'"),
        ({"name": '"Bad_Name"'}, "name: expected `str` matching regex"),
        ({"name": '"-lead"'}, "name: expected `str` matching regex"),
        ({"name": '"' + "a" * 64 + '"'}, "name: expected `str` of length <= 63"),
        ({"health_path": '"health"'}, "health_path: expected `str` matching regex"),
        ({"health_path": '"/a b"'}, "health_path: expected `str` matching regex"),
        ({"args": '["ok", 3]'}, "args[1]: expected `str`, got `int`"),
        ({"env": '{ "1X" = "v" }'}, "env: key expected `str` matching regex"),
        ({"env": "{ X = 1 }"}, "env[...]: expected `str`, got `int`"),
        ({"selector": '{ zone = "a b" }'}, "selector[...]: expected `str` matching regex"),
        ({"version": "-1"}, "version: expected `int` >= 0, got -1"),
        ({"version": "1.5"}, "version: expected `int | str`, got `float`"),
        ({"ready_check": '"ping"'}, "ready_check: invalid enum value 'ping'"),
        ({"startup_timeout_s": "0"}, "startup_timeout_s: expected `int` >= 1, got 0"),
        ({"startup_timeout_s": "86401"}, "startup_timeout_s: expected `int` <= 86400"),
        ({"startup_timeout_s": "1.5"}, "startup_timeout_s: expected `int | null`, got `float`"),
        ({"bogus": "1"}, "spec: object contains unknown field `bogus`"),
        ({"model": '""'}, 'model: required for engine "vllm"'),
        ({"gpus_per_node": "0"}, 'gpus_per_node: engine "vllm" needs at least 1'),
        ({"command": '["/bin/x"]'}, 'command: only for engine "command"'),
        ({"args": '["--port", "9"]'}, "args[0]: --port is set by gpud"),
        ({"args": '["x", "--tensor-parallel-size=4"]'}, "args[1]: --tensor-parallel-size is set"),
        ({"args": '["-pp", "2"]'}, "args[0]: -pp is set by gpud"),
        ({"args": '["--distributed-executor-backend", "mp"]'}, "args[0]: --distributed-executor"),
    ],
)
def test_bad_field_is_named(fields: dict[str, str], expected: str) -> None:
    assert error(vllm_with(**fields)).startswith(expected)


def test_missing_required_field() -> None:
    assert error(b'engine = "vllm"\nmodel = "m"\nreplicas = 1').startswith(
        "spec: object missing required field `name`"
    )


@pytest.mark.parametrize("var", sorted(GPUD_ENV))
def test_env_cannot_override_what_gpud_sets(var: str) -> None:
    message = error(vllm_with(env=f'{{ {var} = "x" }}'))
    assert message.startswith(f"env.{var}: gpud sets {var} itself")


@pytest.mark.parametrize(
    ("field", "count"),
    [("args", 129), ("env", 65), ("selector", 17)],
)
def test_collections_are_bounded(field: str, count: int) -> None:
    if field == "args":
        value = "[" + ", ".join('"a"' for _ in range(count)) + "]"
    elif field == "env":
        value = "{" + ", ".join(f'V{i} = "x"' for i in range(count)) + "}"
    else:
        value = "{" + ", ".join(f'k{i} = "x"' for i in range(count)) + "}"
    message = error(vllm_with(**{field: value}))
    assert message.startswith(f"{field}: expected `")
    assert f"got {count} items" in message


def test_long_strings_are_bounded() -> None:
    assert error(vllm_with(args='["' + "x" * 1025 + '"]')).startswith(
        "args[0]: expected `str` of length <= 1024"
    )
    assert error(vllm_with(env='{ X = "' + "v" * 4097 + '" }')).startswith(
        "env[...]: expected `str` of length <= 4096"
    )


def test_oversized_document_is_refused_before_parsing() -> None:
    text = vllm_with() + b"\n#" + b"x" * MAX_SPEC_BYTES
    assert error(text).startswith(f"spec is {len(text)} bytes; at most {MAX_SPEC_BYTES}")


def test_not_toml_and_not_utf8() -> None:
    assert error(b"name = ").startswith("spec is not valid TOML")
    assert error(b'name = "\xff"').startswith("spec is not UTF-8")


def test_nul_in_an_argument_is_refused() -> None:
    assert error(vllm_with(args='["a\\u0000b"]')).startswith("args[0]: expected `str` matching")


def command_with(template: str, **fields: str) -> bytes:
    base = {"name": '"c"', "engine": '"command"', "replicas": "1", "command": template}
    base.update(fields)
    return "\n".join(f"{k} = {v}" for k, v in base.items()).encode()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            '["/bin/srv", "{prot}"]',
            "command[1]: unknown placeholder {prot}; known: {gpu_indices}, {gpu_uuids}",
        ),
        ('["/bin/srv", "{}"]', "command[1]: {} is not a plain placeholder"),
        ('["/bin/srv", "{0}"]', "command[1]: {0} is not a plain placeholder"),
        ('["/bin/srv", "{port.real}"]', "command[1]: {port.real} is not a plain placeholder"),
        ('["/bin/srv", "{port!r}"]', "command[1]: {port} is not a plain placeholder"),
        ('["/bin/srv", "{port:>9}"]', "command[1]: {port} is not a plain placeholder"),
        ('["/bin/srv", "{port"]', "command[1]: "),
        ('["srv", "{port}"]', "command[0]: 'srv' must be an absolute path"),
        ('["/bin/{model}"]', "command[0]: '/bin/{model}' must be an absolute path"),
        ('["/bin/srv", "{ray_address}"]', "command[1]: {ray_address} needs nodes_per_replica > 1"),
        ('["/bin/srv", "{model}"]', "command[1]: {model} is used but model is empty"),
        ("[]", 'command: required for engine "command"'),
    ],
)
def test_bad_command_template(template: str, expected: str) -> None:
    assert error(command_with(template)).startswith(expected)


def test_command_engine_takes_no_args() -> None:
    assert error(command_with('["/bin/srv"]', args='["x"]')).startswith(
        'args: only for engine "vllm"'
    )


def test_command_engine_may_have_no_gpus_and_no_model() -> None:
    spec = load_spec(command_with('["/bin/srv", "--port", "{port}"]'))
    assert spec.gpus_per_node == 0 and spec.model == ""


def test_spec_is_immutable() -> None:
    spec = load_spec(VLLM)
    with pytest.raises(AttributeError):
        spec.replicas = 3  # type: ignore[misc]
    assert isinstance(spec, DeploymentSpec)


def test_decode_holds_peers_to_the_same_checks() -> None:
    body = encode(load_spec(VLLM)).replace(b'"replicas":2', b'"replicas":-5')
    with pytest.raises(SpecError, match=r"^replicas: expected `int` >= 0, got -5"):
        decode(body)
    body = encode(load_spec(VLLM)).replace(b'"HF_HOME"', b'"VLLM_PORT"')
    with pytest.raises(SpecError, match=r"^env.VLLM_PORT: gpud sets"):
        decode(body)
    with pytest.raises(SpecError, match="not valid JSON"):
        decode(b"{")


# The canonical JSON of this spec under gpud 0.1 (before startup_timeout_s and ready_check):
# what its operator signed and what a 0.1 peer, which refuses unknown fields, accepts.
SPEC_0_1 = (
    b'name = "web"\nengine = "command"\nreplicas = 2\n'
    b'command = ["/usr/bin/python3", "-m", "x", "{port}"]\n'
)
CANONICAL_0_1 = (
    b'{"args":[],"command":["/usr/bin/python3","-m","x","{port}"],"engine":"command","env":{},'
    b'"gpus_per_node":0,"health_path":"/health","model":"","name":"web","nodes_per_replica":1,'
    b'"replicas":2,"selector":{},"version":""}'
)


def test_a_spec_without_the_new_fields_keeps_its_0_1_bytes_and_signature() -> None:
    s = load_spec(SPEC_0_1)
    assert encode(s) == CANONICAL_0_1
    assert decode(CANONICAL_0_1) == s


def test_the_new_fields_travel_when_set() -> None:
    s = load_spec(SPEC_0_1 + b'startup_timeout_s = 90\nready_check = "health"\n')
    body = encode(s)
    assert b'"startup_timeout_s":90' in body and b"ready_check" not in body
    assert decode(body) == s

"""Engines: the exact argv and environment gpud hands to exec, checked against vLLM's flags."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gpud.deployments.engines import (
    EngineError,
    NodeLease,
    executable_allowed,
    local_model_missing,
    node_env,
    server_argv,
)
from gpud.deployments.spec import DeploymentSpec, load_spec
from gpud.errors import GpudError


def vllm_spec(n: int = 2, g: int = 2, args: str = "[]", env: str = "{}") -> DeploymentSpec:
    return load_spec(
        f'name = "llama"\nengine = "vllm"\nmodel = "meta-llama/Llama-3.1-8B"\nreplicas = 2\n'
        f"nodes_per_replica = {n}\ngpus_per_node = {g}\nargs = {args}\nenv = {env}\n".encode()
    )


def lease(**over: object) -> NodeLease:
    fields: dict[str, object] = {
        "host_ip": "10.77.0.5",
        "interface": "eth1",
        "port": 20110,
        "port_band_base": 20120,
        "gpu_uuids": ("GPU-aaaa", "GPU-bbbb"),
        "gpu_indices": (3, 1),
        "ray_address": "10.77.0.5:20100",
    }
    fields.update(over)
    return NodeLease(**fields)  # type: ignore[arg-type]


def test_vllm_multi_node_argv() -> None:
    argv = server_argv(vllm_spec(args='["--max-model-len", "8192"]'), lease())
    assert argv == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B",
        "--host", "10.77.0.5",
        "--port", "20110",
        "--tensor-parallel-size", "2",
        "--pipeline-parallel-size", "2",
        "--distributed-executor-backend", "ray",
        "--max-model-len", "8192",
    ]  # fmt: skip


def test_vllm_single_node_argv_has_no_ray_backend() -> None:
    argv = server_argv(
        vllm_spec(n=1, g=1),
        lease(gpu_uuids=("GPU-aaaa",), gpu_indices=(0,), ray_address=""),
        vllm="/opt/v/bin/vllm",
    )
    assert argv == [
        "/opt/v/bin/vllm", "serve", "meta-llama/Llama-3.1-8B",
        "--host", "10.77.0.5",
        "--port", "20110",
        "--tensor-parallel-size", "1",
        "--pipeline-parallel-size", "1",
    ]  # fmt: skip


def test_vllm_env_on_every_node() -> None:
    env = node_env(vllm_spec(env='{ HF_HOME = "/cache" }'), lease(), base={"PATH": "/usr/bin"})
    assert env == {
        "PATH": "/usr/bin",
        "HF_HOME": "/cache",
        # Output in order: the last line is the reason it exited, not a late stdout flush.
        "PYTHONUNBUFFERED": "1",
        "VLLM_HOST_IP": "10.77.0.5",
        "NCCL_SOCKET_IFNAME": "eth1",
        "GLOO_SOCKET_IFNAME": "eth1",
        "VLLM_PORT": "20120",
        # NVML indices in the leased UUIDs' order, counted in PCI bus order: never a UUID.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "3,1",
        "RAY_ADDRESS": "10.77.0.5:20100",
    }


def test_gpud_values_win_over_what_gpud_inherited() -> None:
    base = {"VLLM_HOST_IP": "127.0.0.1", "RAY_ADDRESS": "auto", "VLLM_PORT": "1", "X": "y"}
    spec = load_spec(b'name = "c"\nengine = "command"\nreplicas = 1\ncommand = ["/bin/srv"]\n')
    env = node_env(
        spec, lease(gpu_uuids=(), gpu_indices=(), ray_address="", port_band_base=None), base=base
    )
    assert env["VLLM_HOST_IP"] == "10.77.0.5"
    assert "RAY_ADDRESS" not in env and "VLLM_PORT" not in env
    # No GPU leased: the process sees none rather than all of them.
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["X"] == "y"
    unbuffered = load_spec(
        b'name = "c"\nengine = "command"\nreplicas = 1\ncommand = ["/bin/srv"]\n'
        b'env = { PYTHONUNBUFFERED = "" }\n'
    )
    assert node_env(unbuffered, lease(ray_address="", port_band_base=None, gpu_uuids=(),
                                      gpu_indices=()))["PYTHONUNBUFFERED"] == ""  # fmt: skip


def command_spec(template: str, n: int = 2, g: int = 2) -> DeploymentSpec:
    return load_spec(
        f'name = "sg"\nengine = "command"\nmodel = "Qwen/Qwen2.5-0.5B"\nreplicas = 1\n'
        f"nodes_per_replica = {n}\ngpus_per_node = {g}\ncommand = {template}\n".encode()
    )


def test_command_template_fills_every_placeholder() -> None:
    spec = command_spec(
        '["/opt/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "{model}",'
        ' "--host={host_ip}", "--port", "{port}", "--dist-init-addr", "{ray_address}",'
        ' "--nic", "{interface}", "--gpus", "{gpu_uuids}", "--devices={gpu_indices}",'
        ' "{{literal}}"]'
    )
    assert server_argv(spec, lease()) == [
        "/opt/sglang/bin/python", "-m", "sglang.launch_server",
        "--model-path", "Qwen/Qwen2.5-0.5B",
        "--host=10.77.0.5",
        "--port", "20110",
        "--dist-init-addr", "10.77.0.5:20100",
        "--nic", "eth1",
        "--gpus", "GPU-aaaa,GPU-bbbb",
        "--devices=3,1",
        "{literal}",
    ]  # fmt: skip


def test_substitution_never_splits_or_interprets_values() -> None:
    odd = load_spec(
        b'name = "x"\nengine = "command"\nmodel = "m; rm -rf / $(id) `x` {port}"\nreplicas = 1\n'
        b'command = ["/bin/srv", "{model}", "$(id)", "a b;c"]\n'
    )
    argv = server_argv(odd, lease(gpu_uuids=(), gpu_indices=(), ray_address=""))
    # The value is one argument, verbatim; "{port}" inside a value is not expanded again.
    assert argv == ["/bin/srv", "m; rm -rf / $(id) `x` {port}", "$(id)", "a b;c"]


def test_a_spec_built_without_load_spec_cannot_smuggle_a_field() -> None:
    good = command_spec('["/bin/srv", "{port}"]', n=1, g=0)
    bad = msgspec.structs.replace(good, command=["/bin/srv", "{lease.__class__}"])
    with pytest.raises(ValueError, match="not a plain placeholder"):
        server_argv(bad, lease(gpu_uuids=(), gpu_indices=(), ray_address=""))
    bad = msgspec.structs.replace(good, command=["/bin/srv", "{secret}"])
    with pytest.raises(EngineError, match=r"unknown placeholder \{secret\}"):
        server_argv(bad, lease(gpu_uuids=(), gpu_indices=(), ray_address=""))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"gpu_uuids": ("GPU-a",)}, "1 GPUs leased, the spec needs 2"),
        ({"gpu_indices": (0,)}, "2 GPUs leased but 1 NVML indices resolved"),
        ({"gpu_indices": ("GPU-aaaa", "GPU-bbbb")}, "'GPU-aaaa' is not an NVML index"),
        ({"gpu_indices": (1, 1)}, r"GPU indices \[1, 1\] name one GPU twice"),
        ({"gpu_indices": (-1, 0)}, "-1 is not an NVML index"),
        ({"ray_address": ""}, "a Ray address is needed exactly when nodes_per_replica > 1"),
        ({"port_band_base": None}, "vLLM needs a leased port band"),
        ({"host_ip": "node-5"}, "host_ip 'node-5' is not an IP address"),
        ({"interface": ""}, "no verified interface"),
    ],
)
def test_leases_that_do_not_fit_are_refused(over: dict[str, object], message: str) -> None:
    with pytest.raises(EngineError, match=message):
        server_argv(vllm_spec(), lease(**over))
    with pytest.raises(EngineError, match=message):
        node_env(vllm_spec(), lease(**over))


def test_single_node_replica_with_a_ray_address_is_refused() -> None:
    with pytest.raises(EngineError, match="exactly when"):
        server_argv(vllm_spec(n=1), lease())


def test_executable_allowed_exact_absolute_paths_only() -> None:
    allow = ["/opt/sglang/bin/python", "/usr/bin/llama-server", "relative/bin"]
    assert executable_allowed("/opt/sglang/bin/python", allow)
    assert executable_allowed("/usr/bin/llama-server", allow)
    assert not executable_allowed("/usr/bin/llama-server2", allow)
    assert not executable_allowed("/opt/sglang/bin", allow), "no prefix match"
    assert not executable_allowed("/opt/sglang/bin/../bin/python", allow), "no .. games"
    assert not executable_allowed("//opt/sglang/bin/python", allow)
    assert not executable_allowed("relative/bin", allow), "relative paths never match"
    assert not executable_allowed("python", allow)
    assert not executable_allowed("/bin/sh", [])


def test_engine_errors_are_operator_errors() -> None:
    """Shown as is (no traceback) wherever a GpudError is, and still a ValueError."""
    assert issubclass(EngineError, GpudError) and issubclass(EngineError, ValueError)


def test_a_local_model_path_this_host_lacks_is_named(tmp_path: Path) -> None:
    here = tmp_path / "llama"
    here.mkdir()

    def spec_of(model: str) -> DeploymentSpec:
        return load_spec(f'name = "m"\nengine = "vllm"\nmodel = "{model}"\nreplicas = 1\n'
                         f"gpus_per_node = 1\n".encode())  # fmt: skip

    assert local_model_missing(spec_of(str(here))) == ""
    assert local_model_missing(spec_of("meta-llama/Llama-3.1-8B")) == ""  # a hub name
    missing = local_model_missing(spec_of(str(tmp_path / "absent")))
    assert str(tmp_path / "absent") in missing and "does not exist on this host" in missing

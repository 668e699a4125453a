"""Multi-host test harness: hosts in network namespaces, faults, and real gpud nodes.

    from tests.harness.netns import Network          # bridge + N namespaces (Host objects)
    from tests.harness import faults                 # partition, one_way, block_port, loss, heal,
                                                     # port_mapped_host (Docker-style DNAT/SNAT)
    from tests.harness.gpud_node import Cluster, GpudNode, wait_for

In tests prefer the `network` and `cluster` fixture factories from tests/conftest.py, and mark
the test `@pytest.mark.netns` (skipped with a reason where namespaces cannot be made).
`python -m tests.harness.demo` brings up a 3-node cluster and prints `gpud status` per host.

Everything tests share is here, never in a test module: `wait` (the one way to wait), `config`
(building a config), `serf` (bare serf agents, free ports), `agent` (one real `gpud agent`),
`ray_loopback` (in-process Ray nodes over a loopback query transport), `ray_cluster` (Ray on
namespace clusters: heads, steady clusters, head samplers), `ray_views` (election inputs),
`health_loopback`, `ports`, `block_model`, `placement`, `deployments`, `router_cluster`,
`vllm_cluster`; the stand-ins `fake_nvml`, `fake_vllm`, `deploy_server`, `router_load` and
`lease_storm`.
"""

"""Deployments: "serve model M with R replicas, each on N hosts with G GPUs per host".

The pure core that everything else stands on, each piece a function of its inputs:

- `spec`: the TOML spec, decoded strictly and bounded (it is gossiped and it runs commands).
- `version`: the order of applies and deletes (Lamport time, origin, digest) and the
  last-writer-wins merge of spec records, so every node ends with the same specs whatever the
  delivery order.
- `placement`: which nodes run which replica, computed identically on every node from the same
  specs, members and announced assignments: deterministic, sticky, spread, never more GPUs than
  a node has, a node in at most one multi-node replica.
- `engines`: the exact argv and environment of `vllm serve` and of `command` templates.

The running component is `service.DeploymentService` (store: `store`, signatures: `authority`,
CLI: `cli`, schemas shared with the CLI and peers: `model`).
"""

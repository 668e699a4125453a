"""The cordon in-process: stored before it is gossiped (it survives a restart), shown in the
status, the summary and the problems (`gpud doctor`), and cleared by uncordon."""

from __future__ import annotations

import time
from pathlib import Path

from gpud.deployments import drain
from gpud.state import StateStore
from tests.harness.deployments import deployment_service


async def test_cordon_is_stored_gossiped_shown_and_survives_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    svc = deployment_service(tmp_path, store)
    assert not svc.status().cordoned and not svc.ctx.tags.cd
    reply = await svc.set_cordon(drain.CordonRecord(since=time.time(), timeout_s=30.0))
    assert reply.cordoned and reply.running_here == []
    assert svc.ctx.tags.cd and svc.status().cordoned
    assert "cordoned" in svc.summary()
    [problem] = [p for p in svc.problems() if p.code == "deployments.cordoned"]
    assert "gpud uncordon" in problem.fix
    store.close()

    # A restart keeps it: the new process gossips it from its first publish.
    store = StateStore(tmp_path / "state")
    restarted = deployment_service(tmp_path, store)
    assert restarted.status().cordoned and restarted.cordon is not None
    assert restarted.cordon.timeout_s == 30.0
    await restarted.set_cordon(None)
    assert not restarted.ctx.tags.cd and not restarted.status().cordoned
    assert not [p for p in restarted.problems() if p.code == "deployments.cordoned"]
    store.close()
    store = StateStore(tmp_path / "state")
    assert deployment_service(tmp_path, store).cordon is None
    store.close()

"""What an idle agent loads (bench.idle holds its RSS to 60 MiB): not pyroute2's every API, not
cryptography until a signed spec needs it; and code that wants the whole pyroute2 package after
gpud loaded its lean part still gets it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_agents_modules_load_neither_all_of_pyroute2_nor_cryptography() -> None:
    out = run(
        """
        import sys
        import gpud.agent, gpud.netcheck.service, gpud.deployments.service
        loaded = set(sys.modules)
        print("ipdb" if "pyroute2.ipdb" in loaded else "", "ndb" if "pyroute2.ndb" in loaded else "")
        print("cryptography" if any(m.startswith("cryptography") for m in loaded) else "none")
        """
    )
    assert out.split() == ["none"], out


def test_pyroute2_as_a_whole_still_works_after_the_lean_import() -> None:
    out = run(
        """
        from gpud.netcheck import lean_pyroute2
        import pyroute2
        from pyroute2 import IPRoute, NDB  # names only the package __init__ defines
        from pyroute2 import netns  # a submodule
        print(pyroute2.AsyncIPRoute is lean_pyroute2.AsyncIPRoute, pyroute2.__version__ != "")
        print(IPRoute.__name__, NDB.__name__, netns.__name__)
        try:
            pyroute2.no_such_name
        except AttributeError as exc:
            print("AttributeError", exc)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "True True"
    assert lines[1] == "IPRoute NDB pyroute2.netns"
    assert lines[2] == "AttributeError module 'pyroute2' has no attribute 'no_such_name'"


def test_a_signature_still_verifies_with_cryptography_loaded_late() -> None:
    out = run(
        """
        import sys
        from gpud.deployments import authority
        from gpud.deployments.version import SpecVersion
        assert "cryptography" not in sys.modules
        private, public = authority.keygen()
        key = authority.load_private(private)
        version = SpecVersion(lamport=3, origin="h1")
        operator, signature = authority.sign_delete("llm", version, key)
        print(operator == public)
        print(repr(authority.delete_signature_refusal("llm", version, operator, signature)))
        other = SpecVersion(lamport=4, origin="h1")
        print(authority.delete_signature_refusal("llm", other, operator, signature) != "")
        """
    )
    assert out.splitlines() == ["True", "''", "True"]

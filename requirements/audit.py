"""`make audit`: requirements/dev.lock against the known vulnerabilities (pip-audit, PyPI's feed).

Reports; fails only on a known vulnerability. Without the network (pip-audit then skips every
package, and would print "No known vulnerabilities found") it says that nothing was audited and
exits 0: an offline machine cannot decide the build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).with_name("dev.lock")


def main() -> int:
    command = [
        sys.executable, "-m", "pip_audit", "--requirement", str(LOCK), "--require-hashes",
        "--disable-pip", "--progress-spinner", "off", "--format", "json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"pip-audit failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        return 0
    dependencies = report["dependencies"]
    audited = [d for d in dependencies if "skip_reason" not in d]
    if not audited:
        print(
            f"nothing audited: pip-audit reached no vulnerability feed for the {len(dependencies)}"
            f" packages of {LOCK.name} (offline?); run `make audit` where PyPI's JSON API answers"
        )
        return 0
    vulnerable = [d for d in audited if d.get("vulns")]
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed release yet"
            print(f"{dependency['name']} {dependency['version']}: {vuln['id']} (fixed in {fixes})")
    skipped = len(dependencies) - len(audited)
    print(
        f"{len(audited)} packages audited, {skipped} skipped, {len(vulnerable)} with a known"
        " vulnerability" + ("; `make lock UPGRADE=1` re-resolves" if vulnerable else "")
    )
    return 1 if vulnerable else 0


if __name__ == "__main__":
    raise SystemExit(main())
